/* A brpc-compatible example.EchoService over mTLS with the trustwire C API. Stock brpc
 * clients (with ssl_options and a client certificate) and trustwire clients can call it.
 *
 *   cc -std=c11 echo_server.c $(pkg-config --cflags --libs trustwire) -o echo_server
 *   (from a checkout, `make examples` builds it into target/release/examples-c, runnable
 *   there without LD_LIBRARY_PATH)
 *   ./echo_server server.toml 127.0.0.1:8443        # Ctrl-C stops it gracefully
 *
 * server.toml is a profile file ("Profile file" in the README): identity, trust, allow-list. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <signal.h>
#include <stdio.h>

#include <trustwire.h>

#include "echo_pb.h"

/* Runs on a trustwire thread: answer quickly, or keep the responder and answer later. */
static void echo(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    size_t size = 0, len = 0;
    const uint8_t *request = tw_call_payload(call, &size);
    const char *message;
    if (echo_decode(request, size, &message, &len) != 0) {
        tw_responder_fail(responder, 1003 /* EREQUEST */, "EchoRequest does not parse");
        return;
    }
    const char *caller = tw_peer_spiffe_id(tw_call_peer(call));
    printf("%s says %.*s\n", caller ? caller : "(no SPIFFE ID)", (int)len, message);
    uint8_t reply[1024];
    size_t n = echo_encode(message, len, reply, sizeof reply);
    if (n == 0) {
        tw_responder_fail(responder, 1003, "message too long for this example");
        return;
    }
    tw_responder_send(responder, reply, n, NULL, 0);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PROFILE.toml HOST:PORT\n", argv[0]);
        return 2;
    }
    /* Block the stop signals before trustwire starts its threads (they inherit the mask), so
     * only sigwait below receives them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    tw_profile *profile = NULL;
    tw_server *server = NULL;
    uint16_t port = 0;
    if (tw_profile_load_file(argv[1], &profile) != TW_OK || tw_server_new(profile, &server) != TW_OK ||
        tw_server_register(server, "example.EchoService", "Echo", echo, NULL) != TW_OK ||
        tw_server_start(server, argv[2], &port) != TW_OK) {
        fprintf(stderr, "%s\n", tw_last_error_message());
        tw_server_free(server);
        tw_profile_free(profile);
        return 1;
    }
    printf("serving example.EchoService on port %u (generation %llu)\n", (unsigned)port,
           (unsigned long long)tw_profile_generation(profile));
    fflush(stdout);

    int sig = 0;
    sigwait(&stop, &sig);

    tw_server_stop(server); /* calls in flight finish first */
    tw_server_free(server);
    tw_profile_free(profile);
    printf("stopped\n");
    return 0;
}
