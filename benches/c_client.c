/* Calls/s of the C client against a server given on the command line, for
 * bindings/c/benches/c_client.rs, which runs the Rust client against the same server in the
 * same run and prints the ratio.
 *
 *   c_client PROFILE ADDRESS SECONDS sequential   one thread, one call at a time
 *   c_client PROFILE ADDRESS SECONDS concurrent   64 asynchronous calls kept in flight
 *
 * Prints "calls N seconds S". */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <trustwire.h>

#define IN_FLIGHT 64

static const char PAYLOAD[] = "\x0a\x0bhello world"; /* EchoRequest{message: "hello world"} */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, tw_result r) {
    fprintf(stderr, "%s: %s: %s\n", what, tw_result_name(r), tw_last_error_message());
    exit(1);
}

typedef struct {
    const tw_client *client;
    double deadline;
    atomic_long calls;
    atomic_int failures;
    atomic_int running;
} state;

static void issue(state *s);

static void done(void *user_data, tw_result result, const tw_response *response) {
    (void)response;
    state *s = user_data;
    if (result != TW_OK) atomic_fetch_add(&s->failures, 1);
    atomic_fetch_add(&s->calls, 1);
    if (now() < s->deadline)
        issue(s);
    else
        atomic_fetch_sub(&s->running, 1);
}

static void issue(state *s) {
    tw_result r = tw_client_call_async(s->client, "example.EchoService", "Echo", (const uint8_t *)PAYLOAD,
                                       sizeof PAYLOAD - 1, NULL, done, s);
    if (r != TW_OK) die("tw_client_call_async", r);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: c_client PROFILE ADDRESS SECONDS sequential|concurrent\n");
        return 2;
    }
    double seconds = atof(argv[3]);
    tw_profile *profile = NULL;
    tw_result r = tw_profile_load_file(argv[1], &profile);
    if (r != TW_OK) die("tw_profile_load_file", r);
    tw_client *client = NULL;
    if ((r = tw_client_new(profile, argv[2], &client)) != TW_OK) die("tw_client_new", r);
    /* Connect (and warm up) outside the measurement, as the Rust side does. */
    tw_response *resp = NULL;
    if ((r = tw_client_call(client, "example.EchoService", "Echo", (const uint8_t *)PAYLOAD, sizeof PAYLOAD - 1, NULL,
                            &resp)) != TW_OK)
        die("warm-up call", r);
    tw_response_free(resp);

    long calls = 0;
    double start = now();
    if (strcmp(argv[4], "sequential") == 0) {
        double deadline = start + seconds;
        while (now() < deadline) {
            r = tw_client_call(client, "example.EchoService", "Echo", (const uint8_t *)PAYLOAD, sizeof PAYLOAD - 1, NULL,
                               &resp);
            if (r != TW_OK) die("tw_client_call", r);
            tw_response_free(resp);
            calls++;
        }
    } else {
        static state s;
        s.client = client;
        s.deadline = start + seconds;
        atomic_init(&s.calls, 0);
        atomic_init(&s.failures, 0);
        atomic_init(&s.running, IN_FLIGHT);
        for (int i = 0; i < IN_FLIGHT; i++) issue(&s);
        struct timespec tick = {0, 1000000};
        while (atomic_load(&s.running) > 0) nanosleep(&tick, NULL);
        if (atomic_load(&s.failures) > 0) {
            fprintf(stderr, "%d calls failed\n", atomic_load(&s.failures));
            return 1;
        }
        calls = atomic_load(&s.calls);
    }
    double elapsed = now() - start;
    printf("calls %ld seconds %.3f\n", calls, elapsed);
    tw_client_free(client);
    tw_profile_free(profile);
    return 0;
}
