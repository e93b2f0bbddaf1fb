/* The bytes one engine step streams to its clients, sent by the same OpenMP team that computed the step.
 * A loopback TCP send of one SSE chunk costs ~15 us of kernel time (the receiver's TCP path and wake-up run in
 * the sender's context); 32 streams sent one after another on the engine's thread leave the second core spinning
 * for ~0.5 ms per step. Called through ctypes, which releases the GIL. */
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>
#include "kernels.h"

/* out[i] = bytes of bufs[i] (lens[i] long) that the non-blocking send to fds[i] took, or -errno */
void minimind_send_many(int64_t n, const int64_t *fds, const char *const *bufs, const int64_t *lens, int64_t *out,
                        int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n > 1)
    for (int64_t i = 0; i < n; i++) {
        ssize_t sent = send((int)fds[i], bufs[i], (size_t)lens[i], MSG_DONTWAIT | MSG_NOSIGNAL);
        out[i] = sent >= 0 ? (int64_t)sent : -(int64_t)errno;
    }
}
