// The official npm clients against ollamaflow: one chat (streamed) and one
// embedding with each of `ollama` and `openai`. The e2e suite runs it with
// PROXY_URL, CHAT_MODEL and EMBED_MODEL set, and reads one JSON line per check
// from stdout. A check that throws is reported, not fatal, so every check runs.
import { Ollama } from 'ollama'
import OpenAI from 'openai'

const proxy = process.env.PROXY_URL
const chatModel = process.env.CHAT_MODEL
const embedModel = process.env.EMBED_MODEL
if (!proxy || !chatModel || !embedModel) {
  console.error('set PROXY_URL, CHAT_MODEL and EMBED_MODEL')
  process.exit(2)
}

const ollama = new Ollama({ host: proxy })
const openai = new OpenAI({ baseURL: `${proxy}/v1`, apiKey: 'unused', maxRetries: 0 })
const messages = [{ role: 'user', content: 'hi' }]

const checks = {
  async 'ollama.chat'() {
    let chunks = 0
    let text = ''
    let last
    for await (const part of await ollama.chat({ model: chatModel, messages, stream: true, options: { num_predict: 8 } })) {
      chunks++
      text += part.message.content
      last = part
    }
    return { chunks, text, done: last?.done, eval_count: last?.eval_count }
  },
  async 'ollama.embed'() {
    const res = await ollama.embed({ model: embedModel, input: ['hello', 'world'] })
    return { vectors: res.embeddings.length, dims: res.embeddings[0]?.length }
  },
  async 'openai.chat'() {
    const stream = await openai.chat.completions.create({ model: chatModel, messages, max_tokens: 8, stream: true })
    let chunks = 0
    let text = ''
    let finish = null
    for await (const chunk of stream) {
      chunks++
      text += chunk.choices[0]?.delta?.content ?? ''
      finish = chunk.choices[0]?.finish_reason ?? finish
    }
    return { chunks, text, finish_reason: finish }
  },
  async 'openai.embed'() {
    const res = await openai.embeddings.create({ model: embedModel, input: ['hello', 'world'] })
    return { vectors: res.data.length, dims: res.data[0]?.embedding?.length }
  },
}

for (const [name, check] of Object.entries(checks)) {
  try {
    console.log(JSON.stringify({ check: name, ok: true, result: await check() }))
  } catch (err) {
    console.log(JSON.stringify({ check: name, ok: false, error: String(err?.stack ?? err) }))
  }
}
