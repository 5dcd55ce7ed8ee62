/* The C API end to end inside one process: a C server and C clients over mTLS on loopback,
 * refusals with their verdicts, a handler answering from another thread, 1,000 calls in
 * flight, rotation driven from C, and misuse (NULL everywhere, calls after stop or close).
 * Built with -std=c11 -Wall -Wextra -Werror and run under ASan/UBSan and under Valgrind by
 * bindings/c/tests/c_programs.rs. `api_test quick` skips the 1,000-call test (for Valgrind). */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "check.h"

#define SERVICE "example.EchoService"

typedef struct {
    char *cert;
    char *key;
} cred;

static cred issue(const tw_dev_ca *ca, const char *name, const char *spiffe_id) {
    const char *sans[] = {"localhost", "127.0.0.1"};
    cred c = {NULL, NULL};
    OK(tw_dev_ca_issue(ca, name, spiffe_id, sans, 2, 0, 0, TW_USAGE_BOTH, &c.cert, &c.key));
    return c;
}

static void cred_free(cred *c) {
    tw_string_free(c->cert);
    tw_string_free(c->key);
}

static const uint8_t *u8(const char *s) { return (const uint8_t *)s; }

/* A builder with `c` as identity (may be NULL) trusting `trust`'s CA. */
static tw_profile_builder *builder(const tw_dev_ca *trust, const cred *c) {
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    if (c != NULL)
        OK(tw_profile_builder_set_identity_pem(b, u8(c->cert), strlen(c->cert), u8(c->key), strlen(c->key)));
    const char *ca = tw_dev_ca_cert_pem(trust);
    OK(tw_profile_builder_add_trust_pem(b, u8(ca), strlen(ca)));
    return b;
}

static tw_profile *build(tw_profile_builder *b) {
    tw_profile *p = NULL;
    OK(tw_profile_builder_build(b, &p));
    CHECK(p != NULL);
    return p;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- logs ---- */

static struct {
    pthread_mutex_t lock;
    int refusals;    /* "handshake refused ... peer_not_allowed" records seen */
    int too_verbose; /* records above the level asked for */
    int tried_nested;
    tw_result nested; /* what tw_set_log_callback returned from inside the callback */
    char refusal[1024];
} logs = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, TW_OK, ""};

static void on_log(void *user_data, tw_log_level level, const char *target, const char *message) {
    CHECK(user_data == &logs && target != NULL && message != NULL);
    pthread_mutex_lock(&logs.lock);
    if (level == TW_LOG_OFF || level > TW_LOG_INFO) logs.too_verbose++;
    if (!logs.tried_nested) {
        logs.tried_nested = 1;
        logs.nested = tw_set_log_callback(TW_LOG_WARN, NULL, NULL);
    }
    if (strstr(message, "handshake refused") != NULL && strstr(message, "peer_not_allowed") != NULL) {
        logs.refusals++;
        snprintf(logs.refusal, sizeof logs.refusal, "%s: %s", target, message);
    }
    pthread_mutex_unlock(&logs.lock);
}

static int log_refusals(void) {
    pthread_mutex_lock(&logs.lock);
    int n = logs.refusals;
    pthread_mutex_unlock(&logs.lock);
    return n;
}

/* ---- handlers ---- */

static void echo(void *user_data, const tw_call *call, tw_responder *responder) {
    atomic_int *count = user_data;
    atomic_fetch_add(count, 1);
    size_t len = 0, att_len = 0;
    const uint8_t *payload = tw_call_payload(call, &len);
    const uint8_t *att = tw_call_attachment(call, &att_len);
    OK(tw_responder_send(responder, payload, len, att, att_len));
}

/* Answers with the caller's SPIFFE ID; the attachment is its certificate serial. */
static void whoami(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    const tw_peer *peer = tw_call_peer(call);
    CHECK(peer != NULL);
    const char *id = tw_peer_spiffe_id(peer);
    const char *serial = tw_peer_serial(peer);
    CHECK(strlen(tw_peer_fingerprint_sha256(peer)) == 64);
    CHECK(tw_peer_not_after(peer) > tw_peer_not_before(peer));
    CHECK(tw_peer_san_count(peer) >= 2);
    CHECK_STR(tw_peer_san(peer, 0), "dns:localhost");
    CHECK(tw_peer_san(peer, 999) == NULL);
    id = id ? id : "none";
    OK(tw_responder_send(responder, u8(id), strlen(id), u8(serial), strlen(serial)));
}

/* Handlers that answer later: they queue the call, and one worker thread of the test answers
 * it, as a C++ service finishing calls on its own threads would. */
typedef struct job {
    const tw_call *call;
    tw_responder *responder;
    const char *prefix;
    struct job *next;
} job;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    job *head, *tail;
    int stop;
} queue = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0};

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&queue.lock);
        while (queue.head == NULL && !queue.stop) pthread_cond_wait(&queue.ready, &queue.lock);
        job *j = queue.head;
        if (j != NULL) {
            queue.head = j->next;
            if (queue.head == NULL) queue.tail = NULL;
        }
        pthread_mutex_unlock(&queue.lock);
        if (j == NULL) return NULL;
        /* The call stays valid until its responder is consumed, whatever the thread. */
        size_t len = 0;
        const uint8_t *payload = tw_call_payload(j->call, &len);
        char buf[256];
        int n = snprintf(buf, sizeof buf, "%s%.*s", j->prefix, (int)len, (const char *)payload);
        OK(tw_responder_send(j->responder, u8(buf), (size_t)n, NULL, 0));
        free(j);
    }
}

static void enqueue(void *user_data, const tw_call *call, tw_responder *responder) {
    job *j = malloc(sizeof *j);
    CHECK(j != NULL);
    j->call = call;
    j->responder = responder;
    j->prefix = user_data;
    j->next = NULL;
    pthread_mutex_lock(&queue.lock);
    if (queue.tail) queue.tail->next = j; else queue.head = j;
    queue.tail = j;
    pthread_cond_signal(&queue.ready);
    pthread_mutex_unlock(&queue.lock);
}

static void stop_worker(pthread_t t) {
    pthread_mutex_lock(&queue.lock);
    queue.stop = 1;
    pthread_cond_signal(&queue.ready);
    pthread_mutex_unlock(&queue.lock);
    CHECK(pthread_join(t, NULL) == 0);
}

static void refuse(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    (void)call;
    OK(tw_responder_fail(responder, 1003, "the request is not acceptable"));
}

static void drop_call(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    (void)call;
    tw_responder_free(responder);
}

/* Answers with the log_id it got, and what a blocking call from a handler thread returns. */
static void details(void *user_data, const tw_call *call, tw_responder *responder) {
    tw_client *const *slot = user_data; /* filled in once the server has a port */
    const tw_client *client = *slot;
    int64_t log_id = 0;
    tw_result r = tw_call_log_id(call, &log_id);
    tw_response *resp = NULL;
    tw_result nested = tw_client_call(client, SERVICE, "Echo", NULL, 0, NULL, &resp);
    CHECK(resp == NULL);
    char buf[128];
    int n = snprintf(buf, sizeof buf, "%s %s %" PRId64 " %s %s timeout=%d", tw_call_service(call), tw_call_method(call),
                     log_id, tw_result_name(r), tw_result_name(nested), (int)tw_call_timeout_ms(call));
    OK(tw_responder_send(responder, u8(buf), (size_t)n, NULL, 0));
}

/* ---- helpers for calls ---- */

/* A call expected to succeed; returns the payload as a new string. */
static char *call_ok(const tw_client *client, const char *method, const char *payload, const tw_call_options *opts) {
    tw_response *resp = NULL;
    OK(tw_client_call(client, SERVICE, method, u8(payload), strlen(payload), opts, &resp));
    size_t len = 0;
    const uint8_t *p = tw_response_payload(resp, &len);
    char *out = malloc(len + 1);
    CHECK(out != NULL);
    memcpy(out, p, len);
    out[len] = 0;
    CHECK(tw_response_result(resp) == TW_OK);
    CHECK_STR(tw_response_error_message(resp), "");
    tw_response_free(resp);
    return out;
}

static void expect_call(const tw_client *client, const char *method, const char *payload, const char *want) {
    char *got = call_ok(client, method, payload, NULL);
    CHECK_STR(got, want);
    free(got);
}

static void expect_refusal(const tw_client *client, const char *method, tw_result want, int32_t rpc_code) {
    tw_response *resp = NULL;
    EXPECT(tw_client_call(client, SERVICE, method, u8("x"), 1, NULL, &resp), want);
    CHECK(resp == NULL);
    CHECK(tw_last_error_rpc_code() == rpc_code);
    /* The message starts with the verdict's name. */
    const char *name = tw_result_name(want);
    CHECK(strncmp(tw_last_error_message(), name, strlen(name)) == 0);
}

static tw_client *client_for(const tw_profile *p, uint16_t port) {
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)port);
    tw_client *c = NULL;
    OK(tw_client_new(p, addr, &c));
    return c;
}

/* ---- closing a client while another thread's blocking call waits ---- */

static pthread_mutex_t held_lock = PTHREAD_MUTEX_INITIALIZER;
static tw_responder *held; /* the Hold call's responder, once it has come */

static void hold(void *user_data, const tw_call *call, tw_responder *responder) {
    (void)user_data;
    (void)call;
    pthread_mutex_lock(&held_lock);
    held = responder;
    pthread_mutex_unlock(&held_lock);
}

typedef struct {
    const tw_client *client;
    tw_result result;
} held_call;

static void *call_hold(void *arg) {
    held_call *h = arg;
    tw_response *resp = NULL;
    h->result = tw_client_call(h->client, SERVICE, "Hold", u8("x"), 1, NULL, &resp);
    CHECK(resp == NULL);
    CHECK(strstr(tw_last_error_message(), "closed") != NULL);
    return NULL;
}

/* Closing the client from here ends the call another thread is waiting on, at once. */
static void close_during_a_call(const tw_profile *client_profile, uint16_t port) {
    tw_client *c = client_for(client_profile, port);
    held_call h = {c, TW_OK};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, call_hold, &h) == 0);
    tw_responder *r = NULL;
    for (int waited = 0; r == NULL && waited < 10000; waited += 5) {
        sleep_ms(5);
        pthread_mutex_lock(&held_lock);
        r = held;
        pthread_mutex_unlock(&held_lock);
    }
    CHECK(r != NULL);
    OK(tw_client_close(c));
    CHECK(pthread_join(t, NULL) == 0);
    EXPECT(h.result, TW_TRANSPORT);
    tw_responder_free(r);
    pthread_mutex_lock(&held_lock);
    held = NULL;
    pthread_mutex_unlock(&held_lock);
    tw_response *resp = NULL;
    EXPECT(tw_client_call(c, SERVICE, "Echo", u8("x"), 1, NULL, &resp), TW_STOPPED);
    tw_client_free(c);
    printf("close during a call: ok\n");
}

/* ---- 1,000 calls in flight ---- */

typedef struct {
    atomic_int done;
    atomic_int ok;
} tally;

typedef struct {
    tally *tally;
    int index;
} pending;

static void on_done(void *user_data, tw_result result, const tw_response *response) {
    pending *p = user_data;
    char want[32];
    int n = snprintf(want, sizeof want, "call-%d", p->index);
    size_t len = 0;
    const uint8_t *payload = tw_response_payload(response, &len);
    if (result == TW_OK && len == (size_t)n && memcmp(payload, want, len) == 0)
        atomic_fetch_add(&p->tally->ok, 1);
    else
        fprintf(stderr, "call %d: %s %s\n", p->index, tw_result_name(result), tw_response_error_message(response));
    atomic_fetch_add(&p->tally->done, 1);
}

static void thousand_in_flight(const tw_client *client) {
    enum { N = 1000 };
    static pending calls[N];
    tally t;
    atomic_init(&t.done, 0);
    atomic_init(&t.ok, 0);
    for (int i = 0; i < N; i++) {
        calls[i].tally = &t;
        calls[i].index = i;
        char payload[32];
        int n = snprintf(payload, sizeof payload, "call-%d", i);
        /* Half are answered by the worker thread, half inline. */
        OK(tw_client_call_async(client, SERVICE, i % 2 ? "Echo" : "Slow", u8(payload), (size_t)n, NULL, on_done, &calls[i]));
    }
    for (int waited = 0; atomic_load(&t.done) < N && waited < 60000; waited += 10) sleep_ms(10);
    CHECK(atomic_load(&t.done) == N);
    CHECK(atomic_load(&t.ok) == N);
    printf("1000 async calls: all answered\n");
}

/* ---- events and rotation ---- */

typedef struct {
    atomic_int count;
    atomic_uint last_kind;
    atomic_uint last_verdict;
    atomic_ullong last_generation;
} event_log;

static void on_event(void *user_data, const tw_event *ev) {
    event_log *log = user_data;
    CHECK(ev->message != NULL && ev->peer != NULL);
    atomic_store(&log->last_kind, (unsigned)ev->kind);
    atomic_store(&log->last_verdict, (unsigned)ev->verdict);
    atomic_store(&log->last_generation, (unsigned long long)ev->generation);
    atomic_fetch_add(&log->count, 1);
}

static void wait_events(event_log *log, int n) {
    for (int waited = 0; atomic_load(&log->count) < n && waited < 10000; waited += 5) sleep_ms(5);
    CHECK(atomic_load(&log->count) >= n);
}

/* Rotates the client's identity from C: a new connection presents the new certificate; a
 * key that does not match is refused and the previous generation stays in service. */
static void rotation(const tw_dev_ca *ca, uint16_t port) {
    cred first = issue(ca, "client", "spiffe://example.org/client");
    cred second = issue(ca, "client", "spiffe://example.org/client");
    tw_profile *p = build(builder(ca, &first));
    event_log log;
    atomic_init(&log.count, 0);
    atomic_init(&log.last_kind, 0);
    atomic_init(&log.last_verdict, 0);
    atomic_init(&log.last_generation, 0);
    OK(tw_profile_subscribe(p, on_event, &log));
    CHECK(tw_profile_generation(p) == 1);

    char *serial1 = NULL;
    OK(tw_profile_serial(p, &serial1));
    tw_client *before = client_for(p, port);
    tw_response *resp = NULL;
    OK(tw_client_call(before, SERVICE, "WhoAmI", NULL, 0, NULL, &resp));
    size_t len = 0;
    const uint8_t *att = tw_response_attachment(resp, &len);
    CHECK(len == strlen(serial1) && memcmp(att, serial1, len) == 0);
    tw_response_free(resp);

    uint64_t generation = 0;
    OK(tw_profile_set_identity_pem(p, u8(second.cert), strlen(second.cert), u8(second.key), strlen(second.key), &generation));
    CHECK(generation == 2 && tw_profile_generation(p) == 2);
    wait_events(&log, 1);
    CHECK(atomic_load(&log.last_kind) == TW_EVENT_RELOADED);
    CHECK(atomic_load(&log.last_generation) == 2);

    char *serial2 = NULL;
    OK(tw_profile_serial(p, &serial2));
    CHECK(strcmp(serial1, serial2) != 0);
    tw_client *after = client_for(p, port);
    OK(tw_client_call(after, SERVICE, "WhoAmI", NULL, 0, NULL, &resp));
    att = tw_response_attachment(resp, &len);
    CHECK(len == strlen(serial2) && memcmp(att, serial2, len) == 0);
    tw_response_free(resp);

    /* The first certificate with the second key: refused, generation 2 stays. */
    EXPECT(tw_profile_set_identity_pem(p, u8(first.cert), strlen(first.cert), u8(second.key), strlen(second.key), &generation),
           TW_KEY_MISMATCH);
    wait_events(&log, 2);
    CHECK(atomic_load(&log.last_kind) == TW_EVENT_REJECTED);
    CHECK(atomic_load(&log.last_verdict) == TW_KEY_MISMATCH);
    /* A half-written key file's worth of bytes. */
    EXPECT(tw_profile_set_identity_pem(p, u8(first.cert), strlen(first.cert), u8(first.key), strlen(first.key) / 2, NULL),
           TW_BAD_PEM);
    CHECK(tw_profile_generation(p) == 2);
    expect_call(after, "Echo", "still serving", "still serving");

    tw_client_free(before);
    tw_client_free(after);
    tw_string_free(serial1);
    tw_string_free(serial2);
    /* After free returns, no callback runs: `log` may go out of scope. */
    tw_profile_free(p);
    cred_free(&first);
    cred_free(&second);
    printf("rotation from C: ok\n");
}

/* ---- misuse ---- */

static void misuse(const tw_dev_ca *ca, const tw_profile *server_profile, const tw_profile *client_profile) {
    /* Every free accepts NULL. */
    tw_profile_builder_free(NULL);
    tw_profile_free(NULL);
    tw_server_free(NULL);
    tw_client_free(NULL);
    tw_call_options_free(NULL);
    tw_response_free(NULL);
    tw_responder_free(NULL);
    tw_dev_ca_free(NULL);
    tw_proxy_free(NULL);
    tw_string_free(NULL);

    /* NULL arguments are errors, never crashes. */
    EXPECT(tw_profile_builder_new(NULL), TW_NULL_ARGUMENT);
    CHECK(strncmp(tw_last_error_message(), "null_argument", 13) == 0);
    EXPECT(tw_profile_builder_allow(NULL, "*"), TW_NULL_ARGUMENT);
    EXPECT(tw_profile_builder_build(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_profile_load_file(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_profile_reload(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_profile_subscribe(server_profile, NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_server_new(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_server_register(NULL, SERVICE, "Echo", echo, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_server_start(NULL, "127.0.0.1:0", NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_server_stop(NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_client_new(client_profile, NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_client_call(NULL, SERVICE, "Echo", NULL, 0, NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_client_call_async(NULL, SERVICE, "Echo", NULL, 0, NULL, on_done, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_client_close(NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_call_options_set_timeout_ms(NULL, 5), TW_NULL_ARGUMENT);
    EXPECT(tw_responder_send(NULL, NULL, 0, NULL, 0), TW_NULL_ARGUMENT);
    EXPECT(tw_responder_fail(NULL, 1, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_call_log_id(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_dev_ca_new(NULL, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_metrics_text(NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_identity_token_verify(NULL, 3, "k", u8("s"), 1, NULL, 0, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_identity_token_verify_for(NULL, 3, "k", u8("s"), 1, "in", 300, NULL, 0, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_identity_token_verify_for(u8("t"), 1, "k", u8("s"), 1, NULL, 300, NULL, 0, NULL), TW_NULL_ARGUMENT);
    EXPECT(tw_proxy_start(NULL, NULL), TW_NULL_ARGUMENT);
    CHECK(tw_profile_generation(NULL) == 0);
    CHECK(tw_call_peer(NULL) == NULL);
    CHECK(tw_call_service(NULL) == NULL);
    CHECK(tw_peer_spiffe_id(NULL) == NULL);
    CHECK(tw_peer_san_count(NULL) == 0);
    CHECK(tw_response_result(NULL) == TW_NULL_ARGUMENT);
    CHECK(tw_dev_ca_cert_pem(NULL) == NULL);
    CHECK(tw_server_port(NULL) == 0);
    CHECK(tw_proxy_route_count(NULL) == 0);
    CHECK_STR(tw_result_name(9999), "unknown");
    CHECK_STR(tw_result_name(TW_PEER_NOT_ALLOWED), "peer_not_allowed");

    /* Bad settings and material name what is wrong. */
    tw_profile_builder *b = NULL;
    OK(tw_profile_builder_new(&b));
    EXPECT(tw_profile_builder_allow(b, "not a pattern"), TW_INVALID_CONFIG);
    EXPECT(tw_profile_builder_set_handshake_timeout_ms(b, 0), TW_INVALID_ARGUMENT);
    const char *bad_utf8 = "\xff\xfe";
    EXPECT(tw_profile_builder_set_server_name(b, bad_utf8), TW_INVALID_ARGUMENT);
    EXPECT(tw_profile_builder_add_trust_pem(b, NULL, 10), TW_NULL_ARGUMENT);
    /* No trust: refused, and the builder is consumed all the same. */
    tw_profile *p = NULL;
    EXPECT(tw_profile_builder_build(b, &p), TW_INVALID_CONFIG);
    CHECK(p == NULL);
    b = builder(ca, NULL);
    OK(tw_profile_builder_add_trust_pem(b, u8("-----BEGIN CERTIFICATE-----\nAAAA"), 32));
    EXPECT(tw_profile_builder_build(b, &p), TW_BAD_PEM);
    CHECK(tw_profile_builder_build(builder(ca, NULL), NULL) == TW_NULL_ARGUMENT);
    EXPECT(tw_profile_load_file("/nonexistent/profile.toml", &p), TW_INVALID_CONFIG);

    /* A profile without identity cannot serve. */
    p = build(builder(ca, NULL));
    CHECK(!tw_profile_can_serve(p));
    tw_server *s = NULL;
    EXPECT(tw_server_new(p, &s), TW_INVALID_CONFIG);
    int64_t not_after = 0;
    EXPECT(tw_profile_not_after(p, &not_after), TW_NOT_FOUND);
    tw_profile_free(p);

    /* Server life cycle: register before start; start once; stop twice; nothing after stop. */
    atomic_int n;
    atomic_init(&n, 0);
    OK(tw_server_new(server_profile, &s));
    OK(tw_server_register(s, SERVICE, "Echo", echo, &n));
    EXPECT(tw_server_register(s, SERVICE, NULL, echo, &n), TW_NULL_ARGUMENT);
    EXPECT(tw_server_register(s, SERVICE, "Echo", NULL, &n), TW_NULL_ARGUMENT);
    uint16_t port = 0;
    OK(tw_server_start(s, "127.0.0.1:0", &port));
    CHECK(port != 0 && tw_server_port(s) == port);
    EXPECT(tw_server_start(s, "127.0.0.1:0", NULL), TW_ALREADY_USED);
    EXPECT(tw_server_register(s, SERVICE, "Other", echo, &n), TW_ALREADY_USED);
    tw_client *c = client_for(client_profile, port);
    expect_call(c, "Echo", "once", "once");
    OK(tw_server_stop(s));
    OK(tw_server_stop(s));
    CHECK(tw_server_port(s) == 0);
    EXPECT(tw_server_start(s, "127.0.0.1:0", NULL), TW_STOPPED);
    EXPECT(tw_server_register(s, SERVICE, "Echo", echo, &n), TW_STOPPED);
    tw_server_free(s);
    /* The server is gone: the call fails cleanly. */
    tw_response *resp = NULL;
    tw_result r = tw_client_call(c, SERVICE, "Echo", u8("x"), 1, NULL, &resp);
    CHECK(r == TW_TRANSPORT || r == TW_RPC_ERROR);
    CHECK(resp == NULL);
    /* Nothing after close. */
    OK(tw_client_close(c));
    EXPECT(tw_client_call(c, SERVICE, "Echo", u8("x"), 1, NULL, &resp), TW_STOPPED);
    EXPECT(tw_client_call_async(c, SERVICE, "Echo", u8("x"), 1, NULL, on_done, NULL), TW_STOPPED);
    tw_client_free(c);

    /* A port in use is the machine's state, not a configuration error; no address at all is. */
    OK(tw_server_new(server_profile, &s));
    tw_server *s2 = NULL;
    OK(tw_server_new(server_profile, &s2));
    OK(tw_server_start(s, "127.0.0.1:0", &port));
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)port);
    EXPECT(tw_server_start(s2, addr, NULL), TW_TRANSPORT);
    tw_server_free(s2);
    OK(tw_server_new(server_profile, &s2));
    EXPECT(tw_server_start(s2, "not an address", NULL), TW_INVALID_CONFIG);
    tw_server_free(s2);
    tw_server_free(s); /* frees a running server: stops it first */

    /* Identity tokens that are not valid are refused with a named reason. */
    char id[8];
    EXPECT(tw_identity_token_verify_for(u8("hello"), 5, "k1", u8("secret"), 6, "in", TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS,
                                        id, sizeof id, NULL),
           TW_TOKEN_BAD_FORMAT);
    EXPECT(tw_identity_token_verify_for(u8("hello"), 5, "k1", u8("secret"), 6, "", 300, id, sizeof id, NULL),
           TW_INVALID_ARGUMENT);
    EXPECT(tw_identity_token_verify_for(u8("hello"), 5, "k1", u8("secret"), 6, "in", 0, id, sizeof id, NULL),
           TW_INVALID_ARGUMENT);
    /* The verifier without an audience accepts no token. */
    EXPECT(tw_identity_token_verify(u8("hello"), 5, "k1", u8("secret"), 6, id, sizeof id, NULL),
           TW_TOKEN_AUDIENCE_NOT_CHECKED);
    CHECK_STR(tw_result_name(TW_TOKEN_WRONG_AUDIENCE), "token_wrong_audience");

    char *text = NULL;
    OK(tw_metrics_text(&text));
    CHECK(strstr(text, "trustwire_") != NULL);
    tw_string_free(text);
    printf("misuse: ok\n");
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "quick") == 0;

    /* The header and the library agree on the version. */
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", TW_VERSION_MAJOR, TW_VERSION_MINOR, TW_VERSION_PATCH);
    CHECK_STR(version, TW_VERSION_STRING);
    CHECK_STR(tw_version(), TW_VERSION_STRING);

    tw_dev_ca *ca = NULL, *other_ca = NULL;
    OK(tw_dev_ca_new("example.org", &ca));
    OK(tw_dev_ca_new("other.org", &other_ca));
    cred server_cred = issue(ca, "server", "spiffe://example.org/server");
    cred client_cred = issue(ca, "client", "spiffe://example.org/client");
    cred intruder_cred = issue(ca, "intruder", "spiffe://example.org/intruder");
    cred foreign_cred = issue(other_ca, "foreign", "spiffe://other.org/client");

    /* The server admits two identities, and only one of them may call Admin. */
    tw_profile_builder *sb = builder(ca, &server_cred);
    OK(tw_profile_builder_allow(sb, "spiffe://example.org/client"));
    OK(tw_profile_builder_allow(sb, "spiffe://example.org/admin"));
    const char *admin_methods[] = {SERVICE "/Admin"};
    const char *admins[] = {"spiffe://example.org/admin"};
    OK(tw_profile_builder_add_rule(sb, admin_methods, 1, admins, 1));
    const char *all_methods[] = {SERVICE "/*"};
    const char *anyone[] = {"*"};
    OK(tw_profile_builder_add_rule(sb, all_methods, 1, anyone, 1));
    tw_profile *server_profile = build(sb);
    CHECK(tw_profile_can_serve(server_profile));
    int64_t not_after = 0;
    OK(tw_profile_not_after(server_profile, &not_after));
    CHECK(not_after > (int64_t)time(NULL));

    tw_profile *client_profile = build(builder(ca, &client_cred));

    tw_server *server = NULL;
    atomic_int echoes;
    atomic_init(&echoes, 0);
    tw_client *nested_client = NULL;
    OK(tw_server_new(server_profile, &server));
    OK(tw_server_register(server, SERVICE, "Echo", echo, &echoes));
    OK(tw_server_register(server, SERVICE, "WhoAmI", whoami, NULL));
    OK(tw_server_register(server, SERVICE, "Later", enqueue, "later:"));
    OK(tw_server_register(server, SERVICE, "Slow", enqueue, ""));
    OK(tw_server_register(server, SERVICE, "Refuse", refuse, NULL));
    OK(tw_server_register(server, SERVICE, "Drop", drop_call, NULL));
    OK(tw_server_register(server, SERVICE, "Admin", echo, &echoes));
    OK(tw_server_register(server, SERVICE, "Details", details, &nested_client));
    OK(tw_server_register(server, SERVICE, "Hold", hold, NULL));
    pthread_t worker_thread;
    CHECK(pthread_create(&worker_thread, NULL, worker, NULL) == 0);
    uint16_t port = 0;
    OK(tw_server_start(server, "127.0.0.1:0", &port));
    nested_client = client_for(client_profile, port);

    tw_client *client = client_for(client_profile, port);
    expect_call(client, "Echo", "hello", "hello");
    expect_call(client, "WhoAmI", "", "spiffe://example.org/client");
    expect_call(client, "Later", "from another thread", "later:from another thread");

    /* Options: attachment, log_id, timeout. */
    tw_call_options *opts = NULL;
    OK(tw_call_options_new(&opts));
    OK(tw_call_options_set_attachment(opts, u8("att"), 3));
    OK(tw_call_options_set_log_id(opts, 42));
    OK(tw_call_options_set_timeout_ms(opts, 5000));
    tw_response *resp = NULL;
    OK(tw_client_call(client, SERVICE, "Echo", u8("p"), 1, opts, &resp));
    size_t len = 0;
    const uint8_t *att = tw_response_attachment(resp, &len);
    CHECK(len == 3 && memcmp(att, "att", 3) == 0);
    tw_response_free(resp);
    char *details_text = call_ok(client, "Details", "", opts);
    CHECK_STR(details_text, SERVICE " Details 42 ok would_block timeout=5000");
    free(details_text);
    tw_call_options_free(opts);
    /* Unqualified service names are resolved the way brpc does. */
    OK(tw_client_call(client, "EchoService", "Echo", u8("short"), 5, NULL, &resp));
    tw_response_free(resp);

    /* Errors the server answers with. */
    expect_refusal(client, "Refuse", TW_RPC_ERROR, 1003);
    expect_refusal(client, "NoSuchMethod", TW_RPC_ERROR, 1002);
    expect_refusal(client, "Drop", TW_RPC_ERROR, 2001);
    expect_refusal(client, "Admin", TW_METHOD_NOT_ALLOWED, 1004);

    /* Handshake refusals, each with its verdict. The server's reason reaches the program's
     * log callback. */
    OK(tw_set_log_callback(TW_LOG_INFO, on_log, &logs));
    tw_profile *intruder = build(builder(ca, &intruder_cred));
    tw_client *c = client_for(intruder, port);
    /* The server decides peer_not_allowed and says so with an access_denied alert: the client
     * learns that the peer refused it; the server's verdict is in its metrics. */
    expect_refusal(c, "Echo", TW_PEER_ALERT, 0);
    CHECK(strstr(tw_last_error_message(), "access_denied") != NULL);
    /* The alert can reach the client before the server's handshake task has counted the
     * verdict: wait for it rather than race it. */
    bool counted = false;
    for (int i = 0; i < 5000 && !counted; i++) {
        char *metrics = NULL;
        OK(tw_metrics_text(&metrics));
        counted = strstr(metrics, "verdict=\"peer_not_allowed\"") != NULL;
        tw_string_free(metrics);
        if (!counted) sleep_ms(1);
    }
    CHECK(counted);
    for (int i = 0; i < 5000 && log_refusals() == 0; i++) sleep_ms(1);
    CHECK(log_refusals() > 0);
    OK(tw_set_log_callback(TW_LOG_WARN, NULL, NULL));
    /* The callback is not running any more: no lock needed to read what it wrote. */
    CHECK(strstr(logs.refusal, "spiffe://example.org/intruder") != NULL);
    CHECK(logs.tried_nested && logs.nested == TW_WOULD_BLOCK);
    CHECK(logs.too_verbose == 0);
    EXPECT(tw_set_log_callback(99, NULL, NULL), TW_INVALID_ARGUMENT);
    tw_client_free(c);
    tw_profile_free(intruder);

    tw_profile *distrusting = build(builder(other_ca, &foreign_cred));
    c = client_for(distrusting, port);
    expect_refusal(c, "Echo", TW_UNKNOWN_ISSUER, 0);
    tw_client_free(c);
    tw_profile_free(distrusting);

    tw_profile_builder *nb = builder(ca, &client_cred);
    OK(tw_profile_builder_set_server_name(nb, "elsewhere.example.org"));
    tw_profile *wrong_name = build(nb);
    c = client_for(wrong_name, port);
    expect_refusal(c, "Echo", TW_NAME_MISMATCH, 0);
    tw_client_free(c);
    tw_profile_free(wrong_name);

    tw_profile_builder *pb = builder(ca, &client_cred);
    OK(tw_profile_builder_set_server_spiffe_id(pb, "spiffe://example.org/someone-else"));
    tw_profile *pinned = build(pb);
    c = client_for(pinned, port);
    expect_refusal(c, "Echo", TW_PEER_NOT_ALLOWED, 0);
    tw_client_free(c);
    tw_profile_free(pinned);
    printf("refusals: ok\n");

    close_during_a_call(client_profile, port);
    if (!quick) thousand_in_flight(client);
    rotation(ca, port);
    misuse(ca, server_profile, client_profile);

    tw_client_free(client);
    tw_client_free(nested_client);
    OK(tw_server_stop(server));
    tw_server_free(server);
    stop_worker(worker_thread);
    tw_profile_free(server_profile);
    tw_profile_free(client_profile);
    cred_free(&server_cred);
    cred_free(&client_cred);
    cred_free(&intruder_cred);
    cred_free(&foreign_cred);
    tw_dev_ca_free(ca);
    tw_dev_ca_free(other_ca);
    printf("api_test: all passed\n");
    return 0;
}
