/* Finding 13: tw_server_free called from a handler while another handler of the same server
 * runs on another runtime thread. The program frees the handlers' user_data as soon as
 * tw_server_free returns, as the header allows; the other handler then reads it.
 *
 * Without the fix tw_server_free returned at once: the slow handler read freed memory
 * (AddressSanitizer: heap-use-after-free) and ran after free had returned. With it,
 * tw_server_free waits until the slow handler has returned. Built and run under ASan/UBSan by
 * f13_server_free_from_handler.rs. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define SERVICE "example.EchoService"

struct state {
    int magic;
    tw_server *server;
};

static atomic_int slow_entered;
static atomic_int free_returned;

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Waits up to `ms` for `*flag`; a guard against hangs, never an assertion. */
static int wait_flag(atomic_int *flag, long ms) {
    for (long i = 0; i < ms && !atomic_load(flag); i++) sleep_ms(1);
    return atomic_load(flag);
}

/* Runs while the other handler frees the server, and uses user_data after that free. */
static void slow(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)call;
    struct state *st = user_data;
    atomic_store(&slow_entered, 1);
    /* Fixed: tw_server_free cannot return while this runs, so this waits out the guard. */
    wait_flag(&free_returned, 3000);
    int after_free = atomic_load(&free_returned);
    int magic = st->magic; /* heap-use-after-free without the fix */
    if (after_free) {
        fprintf(stderr, "a handler ran after tw_server_free returned (magic %d)\n", magic);
        _exit(3);
    }
    CHECK(magic == 0x7357);
    tw_responder_send(responder, NULL, 0, NULL, 0);
}

/* Frees its own server once the slow handler is inside C, then the user_data. */
static void quit(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)call;
    struct state *st = user_data;
    CHECK(wait_flag(&slow_entered, 10000));
    tw_responder_send(responder, NULL, 0, NULL, 0);
    tw_server_free(st->server);
    st->magic = 0;
    free(st);
    atomic_store(&free_returned, 1);
}

static tw_profile *profile(const tw_dev_ca *ca, const char *name, const char *spiffe_id) {
    const char *sans[] = {"localhost", "127.0.0.1"};
    char *cert = NULL, *key = NULL;
    OK(tw_dev_ca_issue(ca, name, spiffe_id, sans, 2, 0, 0, TW_USAGE_BOTH, &cert, &key));
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    OK(tw_profile_builder_set_identity_pem(b, (const uint8_t *)cert, strlen(cert), (const uint8_t *)key,
                                           strlen(key)));
    const char *ca_pem = tw_dev_ca_cert_pem(ca);
    OK(tw_profile_builder_add_trust_pem(b, (const uint8_t *)ca_pem, strlen(ca_pem)));
    tw_profile *p = NULL;
    OK(tw_profile_builder_build(b, &p));
    tw_string_free(cert);
    tw_string_free(key);
    return p;
}

struct caller {
    tw_client *client;
    const char *method;
};

static void *call_thread(void *arg) {
    struct caller *c = arg;
    tw_response *resp = NULL;
    /* The answer may or may not arrive: the server is freed while calls are in flight. */
    tw_client_call(c->client, SERVICE, c->method, NULL, 0, NULL, &resp);
    tw_response_free(resp);
    return NULL;
}

int main(void) {
    tw_dev_ca *ca = NULL;
    OK(tw_dev_ca_new("example.org", &ca));
    tw_profile *server_profile = profile(ca, "server", "spiffe://example.org/server");
    tw_profile *client_profile = profile(ca, "client", "spiffe://example.org/client");

    struct state *st = malloc(sizeof *st);
    CHECK(st != NULL);
    st->magic = 0x7357;
    OK(tw_server_new(server_profile, &st->server));
    OK(tw_server_register(st->server, SERVICE, "Slow", slow, st));
    OK(tw_server_register(st->server, SERVICE, "Quit", quit, st));
    uint16_t port = 0;
    OK(tw_server_start(st->server, "127.0.0.1:0", &port));
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)port);

    /* Two connections, so the handlers run on two runtime threads at once. */
    struct caller a = {NULL, "Slow"}, b = {NULL, "Quit"};
    OK(tw_client_new(client_profile, addr, &a.client));
    OK(tw_client_new(client_profile, addr, &b.client));
    pthread_t ta, tb;
    CHECK(pthread_create(&ta, NULL, call_thread, &a) == 0);
    CHECK(wait_flag(&slow_entered, 10000));
    CHECK(pthread_create(&tb, NULL, call_thread, &b) == 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK(wait_flag(&free_returned, 10000));

    tw_client_free(a.client);
    tw_client_free(b.client);
    tw_profile_free(server_profile);
    tw_profile_free(client_profile);
    tw_dev_ca_free(ca);
    printf("f13: no handler ran after tw_server_free returned\n");
    return 0;
}
