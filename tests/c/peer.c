/* A C peer for Rust test harnesses (bindings/c/tests/c_programs.rs), one mode per run:
 *
 *   peer client PROFILE ADDRESS MESSAGE   calls example.EchoService/Echo once; prints
 *                                         "ok PAYLOAD|ATTACHMENT" or "error NAME RPC_CODE MESSAGE"
 *   peer server PROFILE                   serves Echo (inline), Peer (the caller's SPIFFE ID)
 *                                         and Later (answered from another thread); prints
 *                                         "port N", stops when stdin closes
 *   peer token TOKEN KEY_ID SECRET AUDIENCE MAX_AGE
 *                                         verifies an identity token; prints "NAME SPIFFE_ID
 *                                         NOT_AFTER"
 *   peer proxy CONFIG                     runs the proxy in this process; prints "route NAME
 *                                         ADDRESS" per route, drains when stdin closes
 *   peer workload ADDRESS HINT ALLOW      serves like `server`, its SVID taken from the Workload
 *                                         API at ADDRESS (the SVID with HINT), admitting ALLOW
 *   peer hooked CERT KEY CA               serves like `server` with a connection hook (refuses
 *                                         IDs ending in /blocked) and a call hook (Peer is for
 *                                         IDs ending in /admin; log_id 13 gets 2001); prints
 *                                         "hooks N freed" (hook calls) after stopping
 *   peer pkcs11 CHAIN URI MODULE PIN_FILE CA
 *                                         serves like `server`, its key on a PKCS#11 token (set
 *                                         with the builder); prints "error NAME: MESSAGE" when
 *                                         the profile cannot be built
 *
 * Built with -std=c11 -Wall -Wextra -Werror and run under ASan/UBSan. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "check.h"

static const uint8_t *u8(const char *s) { return (const uint8_t *)s; }

static tw_profile *load(const char *path) {
    tw_profile *p = NULL;
    OK(tw_profile_load_file(path, &p));
    return p;
}

static void wait_for_stdin_eof(void) {
    char buf[64];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {
    }
}

static int client(const char *profile_path, const char *address, const char *message) {
    tw_profile *p = load(profile_path);
    tw_client *c = NULL;
    OK(tw_client_new(p, address, &c));
    tw_profile_free(p); /* the client keeps what it needs */
    tw_response *resp = NULL;
    tw_result r = tw_client_call(c, "example.EchoService", "Echo", u8(message), strlen(message), NULL, &resp);
    if (r == TW_OK) {
        size_t len = 0, att_len = 0;
        const uint8_t *payload = tw_response_payload(resp, &len);
        const uint8_t *att = tw_response_attachment(resp, &att_len);
        printf("ok %.*s|%.*s\n", (int)len, (const char *)payload, (int)att_len, (const char *)att);
        tw_response_free(resp);
    } else {
        printf("error %s %d %s\n", tw_result_name(r), (int)tw_last_error_rpc_code(), tw_last_error_message());
    }
    tw_client_free(c);
    return 0;
}

static void echo(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    size_t len = 0;
    const uint8_t *payload = tw_call_payload(call, &len);
    OK(tw_responder_send(responder, payload, len, u8("from C"), 6));
}

static void peer_id(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    const char *id = tw_peer_spiffe_id(tw_call_peer(call));
    id = id ? id : "";
    OK(tw_responder_send(responder, u8(id), strlen(id), NULL, 0));
}

static void *answer(void *arg) {
    tw_responder *responder = arg;
    OK(tw_responder_send(responder, u8("answered from a C thread"), 24, NULL, 0));
    return NULL;
}

typedef struct {
    pthread_t thread;
    int started;
} later_thread;

static void later(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)call;
    later_thread *t = user_data;
    /* One Later call per run in these tests; the main thread joins it. */
    CHECK(!t->started);
    CHECK(pthread_create(&t->thread, NULL, answer, responder) == 0);
    t->started = 1;
}

/* Works until its caller goes away, then says so on stdout. */
static void *work_until_cancelled(void *arg) {
    tw_responder *responder = arg;
    for (int i = 0; i < 3000 && !tw_responder_cancelled(responder); i++) {
        struct timespec ten_ms = {0, 10 * 1000 * 1000};
        nanosleep(&ten_ms, NULL);
    }
    printf(tw_responder_cancelled(responder) ? "caller gone\n" : "caller still there\n");
    fflush(stdout);
    OK(tw_responder_fail(responder, 2003, "the caller went away"));
    return NULL;
}

static void abandoned(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)call;
    later_thread *t = user_data;
    CHECK(!t->started);
    CHECK(!tw_responder_cancelled(responder));
    CHECK(pthread_create(&t->thread, NULL, work_until_cancelled, responder) == 0);
    t->started = 1;
    printf("working\n");
    fflush(stdout);
}

static int serve(tw_profile *p) {
    tw_server *s = NULL;
    later_thread later_t = {.started = 0};
    later_thread abandoned_t = {.started = 0};
    OK(tw_server_new(p, &s));
    OK(tw_server_register(s, "example.EchoService", "Echo", echo, NULL));
    OK(tw_server_register(s, "example.EchoService", "Peer", peer_id, NULL));
    OK(tw_server_register(s, "example.EchoService", "Later", later, &later_t));
    OK(tw_server_register(s, "example.EchoService", "Abandoned", abandoned, &abandoned_t));
    uint16_t port = 0;
    OK(tw_server_start(s, "127.0.0.1:0", &port));
    printf("port %u\n", (unsigned)port);
    fflush(stdout);
    wait_for_stdin_eof();
    OK(tw_server_stop(s));
    if (later_t.started) pthread_join(later_t.thread, NULL);
    if (abandoned_t.started) pthread_join(abandoned_t.thread, NULL);
    tw_server_free(s);
    tw_profile_free(p);
    printf("stopped\n");
    return 0;
}

static int server(const char *profile_path) { return serve(load(profile_path)); }

static int workload(const char *address, const char *hint, const char *allow) {
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    OK(tw_profile_builder_set_workload_api(b, address, NULL, hint));
    OK(tw_profile_builder_allow(b, allow));
    OK(tw_profile_builder_set_name(b, "c-workload"));
    tw_profile *p = NULL;
    OK(tw_profile_builder_build(b, &p)); /* consumes the builder */
    return serve(p);
}

typedef struct {
    pthread_mutex_t lock;
    int calls;
    int freed;
} hook_state;

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void count(hook_state *h) {
    pthread_mutex_lock(&h->lock);
    h->calls++;
    pthread_mutex_unlock(&h->lock);
}

static bool connection_hook(void *user_data, const tw_peer *peer, char *reason, size_t reason_cap) {
    count(user_data);
    const char *id = tw_peer_spiffe_id(peer);
    if (id && ends_with(id, "/blocked")) {
        snprintf(reason, reason_cap, "%s is blocked by the C hook", id);
        return false;
    }
    return true;
}

static int32_t call_hook(void *user_data, const tw_peer *peer, const char *service, const char *method,
                         const tw_call_metadata *metadata, char *text, size_t text_cap) {
    count(user_data);
    const char *id = tw_peer_spiffe_id(peer);
    if (metadata->has_log_id && metadata->log_id == 13) {
        snprintf(text, text_cap, "log_id 13 refused by C for %s/%s", service, method);
        return 2001;
    }
    if (strcmp(method, "Peer") == 0 && !(id && ends_with(id, "/admin"))) {
        snprintf(text, text_cap, "Peer is for admins");
        return 1004;
    }
    return 0;
}

static void free_hook(void *user_data) {
    hook_state *h = user_data;
    pthread_mutex_lock(&h->lock);
    h->freed++;
    pthread_mutex_unlock(&h->lock);
}

static int hooked(const char *cert, const char *key, const char *ca) {
    static hook_state h = {.lock = PTHREAD_MUTEX_INITIALIZER, .calls = 0, .freed = 0};
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    OK(tw_profile_builder_set_identity_files(b, cert, key));
    OK(tw_profile_builder_add_trust_path(b, ca));
    OK(tw_profile_builder_set_connection_hook(b, connection_hook, &h, free_hook));
    OK(tw_profile_builder_set_call_hook(b, call_hook, &h, free_hook));
    tw_profile *p = NULL;
    OK(tw_profile_builder_build(b, &p));
    int rc = serve(p); /* frees the server and the profile */
    /* Connection tasks finish on the runtime's threads after the server stops: wait (bounded)
     * for the last reference to each hook to go. */
    for (int i = 0; i < 200; i++) {
        pthread_mutex_lock(&h.lock);
        int freed = h.freed;
        pthread_mutex_unlock(&h.lock);
        if (freed == 2) break;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&h.lock);
    printf("hooks %d freed %d\n", h.calls, h.freed);
    pthread_mutex_unlock(&h.lock);
    return rc;
}

/* A server whose key stays on a PKCS#11 token, set through the builder. A profile that cannot
 * be built prints "error NAME: MESSAGE" and exits 0, so the caller sees the result code. */
static int pkcs11_server(const char *chain, const char *uri, const char *module, const char *pin_file,
                         const char *ca) {
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    tw_result r = tw_profile_builder_set_identity_pkcs11(b, chain, uri, module, NULL, pin_file);
    if (r == TW_OK) r = tw_profile_builder_add_trust_path(b, ca);
    tw_profile *p = NULL;
    if (r == TW_OK) {
        r = tw_profile_builder_build(b, &p);
    } else {
        tw_profile_builder_free(b);
    }
    if (r != TW_OK) {
        printf("error %s: %s\n", tw_result_name(r), tw_last_error_message());
        return 0;
    }
    return serve(p);
}

static int token(const char *token, const char *key_id, const char *secret, const char *audience, const char *max_age) {
    char spiffe_id[256];
    uint64_t not_after = 0;
    tw_result r = tw_identity_token_verify_for(u8(token), strlen(token), key_id, u8(secret), strlen(secret), audience,
                                               strtoull(max_age, NULL, 10), spiffe_id, sizeof spiffe_id, &not_after);
    printf("%s %s %" PRIu64 "\n", tw_result_name(r), r == TW_OK ? spiffe_id : "-", not_after);
    return 0;
}

static int proxy(const char *config) {
    tw_proxy *p = NULL;
    OK(tw_proxy_start(config, &p));
    for (size_t i = 0; i < tw_proxy_route_count(p); i++)
        printf("route %s %s\n", tw_proxy_route_name(p, i), tw_proxy_route_address(p, i));
    CHECK(tw_proxy_route_name(p, tw_proxy_route_count(p)) == NULL);
    fflush(stdout);
    OK(tw_proxy_reload(p));
    wait_for_stdin_eof();
    OK(tw_proxy_stop(p));
    OK(tw_proxy_stop(p));
    tw_proxy_free(p);
    printf("stopped\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "client") == 0) return client(argv[2], argv[3], argv[4]);
    if (argc == 3 && strcmp(argv[1], "server") == 0) return server(argv[2]);
    if (argc == 7 && strcmp(argv[1], "token") == 0) return token(argv[2], argv[3], argv[4], argv[5], argv[6]);
    if (argc == 3 && strcmp(argv[1], "proxy") == 0) return proxy(argv[2]);
    if (argc == 5 && strcmp(argv[1], "workload") == 0) return workload(argv[2], argv[3], argv[4]);
    if (argc == 5 && strcmp(argv[1], "hooked") == 0) return hooked(argv[2], argv[3], argv[4]);
    if (argc == 7 && strcmp(argv[1], "pkcs11") == 0)
        return pkcs11_server(argv[2], argv[3], argv[4], argv[5], argv[6]);
    fprintf(stderr, "usage: peer client PROFILE ADDRESS MESSAGE | server PROFILE | token TOKEN KEY_ID SECRET AUDIENCE MAX_AGE | proxy CONFIG\n");
    return 2;
}
