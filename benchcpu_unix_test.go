//go:build unix

package ollamaflow

import (
	"syscall"
	"time"
)

// processCPU is the CPU time the test process has used (user and system,
// every thread, GC included): unlike wall time it does not count the time
// other processes of a shared machine hold the cores.
func processCPU() (time.Duration, bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}
