// One official npm client reads a long streamed chat through ollamaflow while the e2e suite
// kills the backend serving it (TestStreamCutReachesClients). Usage: node cut.mjs ollama|openai,
// with PROXY_URL and CHAT_MODEL set. It prints {"event":"first"} when the first chunk arrives
// (the suite then kills the server), and {"event":"end",…} with what the client reported.
import { Ollama } from 'ollama'
import OpenAI from 'openai'

const proxy = process.env.PROXY_URL
const model = process.env.CHAT_MODEL
const which = process.argv[2]
if (!proxy || !model || !['ollama', 'openai'].includes(which)) {
  console.error('usage: PROXY_URL=… CHAT_MODEL=… node cut.mjs ollama|openai')
  process.exit(2)
}
const say = (o) => console.log(JSON.stringify(o))
const messages = [{ role: 'user', content: 'hi' }]
let chunks = 0
const seen = () => {
  if (++chunks === 1) say({ event: 'first' })
}

try {
  let done = false
  if (which === 'ollama') {
    const ollama = new Ollama({ host: proxy })
    for await (const part of await ollama.chat({ model, messages, stream: true, options: { num_predict: 100000 } })) {
      seen()
      done = done || part.done
    }
  } else {
    const openai = new OpenAI({ baseURL: `${proxy}/v1`, apiKey: 'unused', maxRetries: 0 })
    const stream = await openai.chat.completions.create({ model, messages, max_tokens: 100000, stream: true })
    for await (const chunk of stream) {
      seen()
      done = done || Boolean(chunk.choices[0]?.finish_reason)
    }
  }
  say({ event: 'end', ok: true, chunks, done })
} catch (err) {
  say({ event: 'end', ok: false, chunks, error: `${err?.constructor?.name ?? 'Error'}: ${err?.message ?? err}` })
}
