// trustwire.hpp: a header-only C++17 wrapper over trustwire.h.
//
// Handles are move-only and free what they own; handlers and callbacks are std::functions;
// bytes go in as std::string_view and come out as std::string (or views borrowed from a call).
// Every failure is a trustwire::Error exception carrying the result code and its stable name
// (error.verdict(): "peer_alert", "rpc_error", "timeout", ...). Nothing this wrapper runs on
// trustwire's threads lets an exception escape into C.
#ifndef TRUSTWIRE_HPP
#define TRUSTWIRE_HPP

#include <trustwire.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace trustwire {

// A failed call: code() is the C result, verdict() its stable name, rpc_code() the brpc code
// the server answered with (code() == TW_RPC_ERROR or TW_METHOD_NOT_ALLOWED), what() the
// message.
class Error : public std::runtime_error {
public:
    Error(tw_result code, const std::string& message, int32_t rpc_code = 0)
        : std::runtime_error(message), code_(code), rpc_code_(rpc_code) {}
    tw_result code() const noexcept { return code_; }
    const char* verdict() const noexcept { return tw_result_name(code_); }
    int32_t rpc_code() const noexcept { return rpc_code_; }

private:
    tw_result code_;
    int32_t rpc_code_;
};

namespace detail {

// Throws the calling thread's last error when `r` is not TW_OK.
inline void check(tw_result r) {
    if (r != TW_OK) throw Error(r, tw_last_error_message(), tw_last_error_rpc_code());
}

template <class T, void (*Free)(T*)>
struct Deleter {
    void operator()(T* p) const noexcept { Free(p); }
};
template <class T, void (*Free)(T*)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

inline std::string take_string(char* s) {
    std::string out(s != nullptr ? s : "");
    tw_string_free(s);
    return out;
}
inline const uint8_t* bytes(std::string_view s) noexcept { return reinterpret_cast<const uint8_t*>(s.data()); }
inline std::string_view view(const uint8_t* p, size_t n) noexcept {
    return p != nullptr ? std::string_view(reinterpret_cast<const char*>(p), n) : std::string_view();
}
inline std::string_view view(const char* s) noexcept { return s != nullptr ? std::string_view(s) : std::string_view(); }
inline std::vector<const char*> c_strings(const std::vector<std::string>& v) {
    std::vector<const char*> out;
    out.reserve(v.size());
    for (const auto& s : v) out.push_back(s.c_str());
    return out;
}

}  // namespace detail

// The version of the loaded library.
inline std::string version() { return tw_version(); }

// The Prometheus text of this process's trustwire metrics.
inline std::string metrics_text() {
    char* text = nullptr;
    detail::check(tw_metrics_text(&text));
    return detail::take_string(text);
}

// A certificate and its private key, PEM.
struct Credential {
    std::string cert_pem;
    std::string key_pem;
};

// A development CA whose key lives in memory, for tests and demos.
class DevCa {
public:
    explicit DevCa(const std::string& trust_domain) {
        tw_dev_ca* ca = nullptr;
        detail::check(tw_dev_ca_new(trust_domain.c_str(), &ca));
        ca_.reset(ca);
    }
    std::string cert_pem() const { return std::string(detail::view(tw_dev_ca_cert_pem(ca_.get()))); }
    // `sans`: DNS names or IP addresses. `not_before`/`not_after`: Unix seconds, 0 for defaults.
    Credential issue(const std::string& name, const std::optional<std::string>& spiffe_id = std::nullopt,
                     const std::vector<std::string>& sans = {}, tw_usage usage = TW_USAGE_BOTH,
                     int64_t not_before = 0, int64_t not_after = 0) const {
        auto c_sans = detail::c_strings(sans);
        char* cert = nullptr;
        char* key = nullptr;
        detail::check(tw_dev_ca_issue(ca_.get(), name.c_str(), spiffe_id ? spiffe_id->c_str() : nullptr, c_sans.data(),
                                      c_sans.size(), not_before, not_after, usage, &cert, &key));
        return Credential{detail::take_string(cert), detail::take_string(key)};
    }
    std::string crl_pem(const std::vector<std::string>& serials, int64_t next_update) const {
        auto c_serials = detail::c_strings(serials);
        char* pem = nullptr;
        detail::check(tw_dev_ca_crl_pem(ca_.get(), c_serials.data(), c_serials.size(), next_update, &pem));
        return detail::take_string(pem);
    }

private:
    detail::Handle<tw_dev_ca, tw_dev_ca_free> ca_;
};

class ProfileBuilder;

// Certificates, trust, policy and TLS settings in service, reloadable without a restart.
// Servers and clients made from a profile keep working after it is destroyed.
class Profile {
public:
    using EventCallback = std::function<void(const tw_event&)>;

    // Loads a profile file (the TOML format the trustwire command uses); watches its files.
    static Profile load_file(const std::string& path) {
        tw_profile* p = nullptr;
        detail::check(tw_profile_load_file(path.c_str(), &p));
        return Profile(p);
    }

    // Re-reads the sources; returns the generation in service. Throws (and keeps the previous
    // generation) when the new material is refused.
    uint64_t reload() {
        uint64_t g = 0;
        detail::check(tw_profile_reload(get(), &g));
        return g;
    }
    uint64_t set_identity_pem(std::string_view chain, std::string_view key) {
        uint64_t g = 0;
        detail::check(tw_profile_set_identity_pem(get(), detail::bytes(chain), chain.size(), detail::bytes(key), key.size(), &g));
        return g;
    }
    uint64_t set_trust_pem(std::string_view pem) {
        uint64_t g = 0;
        detail::check(tw_profile_set_trust_pem(get(), detail::bytes(pem), pem.size(), &g));
        return g;
    }
    uint64_t set_crls_pem(std::string_view pem) {
        uint64_t g = 0;
        detail::check(tw_profile_set_crls_pem(get(), detail::bytes(pem), pem.size(), &g));
        return g;
    }
    uint64_t generation() const { return tw_profile_generation(get()); }
    int64_t not_after() const {
        int64_t t = 0;
        detail::check(tw_profile_not_after(get(), &t));
        return t;
    }
    std::string serial() const {
        char* s = nullptr;
        detail::check(tw_profile_serial(get(), &s));
        return detail::take_string(s);
    }
    bool can_serve() const { return tw_profile_can_serve(get()); }

    // Calls `callback` for every later credential event, on a thread trustwire runs for this
    // profile's events. The event and its strings are valid during the call. An exception
    // thrown by the callback is dropped (it cannot cross into C).
    void on_event(EventCallback callback) {
        auto slot = std::make_unique<EventCallback>(std::move(callback));
        detail::check(tw_profile_subscribe(get(), &Profile::deliver, slot.get()));
        callbacks_.push_back(std::move(slot));
    }

    const tw_profile* get() const noexcept { return profile_.get(); }

private:
    friend class ProfileBuilder;
    explicit Profile(tw_profile* p) : profile_(p) {}

    static void deliver(void* user_data, const tw_event* event) noexcept {
        try {
            (*static_cast<EventCallback*>(user_data))(*event);
        } catch (...) {
        }
    }

    // Declared first, destroyed last: tw_profile_free returns only once no callback runs.
    std::vector<std::unique_ptr<EventCallback>> callbacks_;
    detail::Handle<tw_profile, tw_profile_free> profile_;
};

// Builds a Profile from settings; build() consumes the builder.
class ProfileBuilder {
public:
    ProfileBuilder() {
        tw_profile_builder* b = nullptr;
        detail::check(tw_profile_builder_new(&b));
        b_.reset(b);
    }
    ProfileBuilder& identity_pem(std::string_view chain, std::string_view key) {
        detail::check(tw_profile_builder_set_identity_pem(b_.get(), detail::bytes(chain), chain.size(), detail::bytes(key), key.size()));
        return *this;
    }
    ProfileBuilder& identity_files(const std::string& chain_path, const std::string& key_path) {
        detail::check(tw_profile_builder_set_identity_files(b_.get(), chain_path.c_str(), key_path.c_str()));
        return *this;
    }
    ProfileBuilder& trust_pem(std::string_view pem) {
        detail::check(tw_profile_builder_add_trust_pem(b_.get(), detail::bytes(pem), pem.size()));
        return *this;
    }
    ProfileBuilder& trust_path(const std::string& path) {
        detail::check(tw_profile_builder_add_trust_path(b_.get(), path.c_str()));
        return *this;
    }
    ProfileBuilder& crl_pem(std::string_view pem) {
        detail::check(tw_profile_builder_add_crl_pem(b_.get(), detail::bytes(pem), pem.size()));
        return *this;
    }
    ProfileBuilder& crl_path(const std::string& path) {
        detail::check(tw_profile_builder_add_crl_path(b_.get(), path.c_str()));
        return *this;
    }
    // An allow-list pattern: spiffe://TD/PATH, spiffe://TD/PREFIX/*, dns:NAME, cn:NAME or *.
    ProfileBuilder& allow(const std::string& pattern) {
        detail::check(tw_profile_builder_allow(b_.get(), pattern.c_str()));
        return *this;
    }
    // Calls to `methods` ("pkg.Service/Method", "pkg.Service/*") only from peers matching `allow`.
    ProfileBuilder& rule(const std::vector<std::string>& methods, const std::vector<std::string>& allow) {
        auto m = detail::c_strings(methods);
        auto a = detail::c_strings(allow);
        detail::check(tw_profile_builder_add_rule(b_.get(), m.data(), m.size(), a.data(), a.size()));
        return *this;
    }
    ProfileBuilder& server_name(const std::string& name) {
        detail::check(tw_profile_builder_set_server_name(b_.get(), name.c_str()));
        return *this;
    }
    ProfileBuilder& server_spiffe_id(const std::string& id) {
        detail::check(tw_profile_builder_set_server_spiffe_id(b_.get(), id.c_str()));
        return *this;
    }
    // Weakens the default: also accept TLS 1.2.
    ProfileBuilder& allow_tls12_insecure() {
        detail::check(tw_profile_builder_allow_tls12_insecure(b_.get()));
        return *this;
    }
    ProfileBuilder& handshake_timeout_ms(uint32_t ms) {
        detail::check(tw_profile_builder_set_handshake_timeout_ms(b_.get(), ms));
        return *this;
    }
    ProfileBuilder& require_fresh_crls(bool require = true) {
        detail::check(tw_profile_builder_require_fresh_crls(b_.get(), require));
        return *this;
    }
    ProfileBuilder& reload(bool watch, uint64_t interval_ms = 0) {
        detail::check(tw_profile_builder_set_reload(b_.get(), watch, interval_ms));
        return *this;
    }
    ProfileBuilder& name(const std::string& name) {
        detail::check(tw_profile_builder_set_name(b_.get(), name.c_str()));
        return *this;
    }
    // Loads and checks the material; the builder is empty afterwards, whatever the outcome.
    Profile build() {
        tw_profile* p = nullptr;
        detail::check(tw_profile_builder_build(b_.release(), &p));
        return Profile(p);
    }

private:
    detail::Handle<tw_profile_builder, tw_profile_builder_free> b_;
};

// The verified identity of a peer; a view valid as long as the call it came from.
class Peer {
public:
    explicit Peer(const tw_peer* p) noexcept : p_(p) {}
    std::optional<std::string_view> spiffe_id() const {
        const char* id = tw_peer_spiffe_id(p_);
        return id != nullptr ? std::optional<std::string_view>(id) : std::nullopt;
    }
    std::string_view fingerprint_sha256() const { return detail::view(tw_peer_fingerprint_sha256(p_)); }
    std::string_view serial() const { return detail::view(tw_peer_serial(p_)); }
    std::string_view subject() const { return detail::view(tw_peer_subject(p_)); }
    // "dns:NAME", "ip:ADDRESS", "uri:URI".
    std::vector<std::string_view> sans() const {
        std::vector<std::string_view> out;
        for (size_t i = 0, n = tw_peer_san_count(p_); i < n; i++) out.push_back(detail::view(tw_peer_san(p_, i)));
        return out;
    }
    int64_t not_after() const { return tw_peer_not_after(p_); }

private:
    const tw_peer* p_;
};

// A call being answered; a view valid until its responder is answered or destroyed.
class Call {
public:
    explicit Call(const tw_call* c) noexcept : c_(c) {}
    std::string_view service() const { return detail::view(tw_call_service(c_)); }
    std::string_view method() const { return detail::view(tw_call_method(c_)); }
    std::string_view payload() const {
        size_t n = 0;
        const uint8_t* p = tw_call_payload(c_, &n);
        return detail::view(p, n);
    }
    std::string_view attachment() const {
        size_t n = 0;
        const uint8_t* p = tw_call_attachment(c_, &n);
        return detail::view(p, n);
    }
    std::optional<int64_t> log_id() const {
        int64_t id = 0;
        return tw_call_log_id(c_, &id) == TW_OK ? std::optional<int64_t>(id) : std::nullopt;
    }
    int32_t timeout_ms() const { return tw_call_timeout_ms(c_); }
    Peer peer() const { return Peer(tw_call_peer(c_)); }

private:
    const tw_call* c_;
};

// The right and duty to answer one call, once, from any thread. Destroyed unanswered, it
// answers EINTERNAL (2001).
class Responder {
public:
    explicit Responder(tw_responder* r) noexcept : r_(r) {}
    Responder(Responder&& other) noexcept : r_(std::exchange(other.r_, nullptr)) {}
    Responder& operator=(Responder&& other) noexcept {
        if (this != &other) {
            tw_responder_free(r_);
            r_ = std::exchange(other.r_, nullptr);
        }
        return *this;
    }
    Responder(const Responder&) = delete;
    Responder& operator=(const Responder&) = delete;
    ~Responder() { tw_responder_free(r_); }

    void send(std::string_view payload, std::string_view attachment = {}) {
        detail::check(tw_responder_send(take(), detail::bytes(payload), payload.size(), detail::bytes(attachment), attachment.size()));
    }
    // `code`: a brpc error code (1003 EREQUEST, 2001 EINTERNAL, ...) or your own, not 0.
    void fail(int32_t code, const std::string& text) { detail::check(tw_responder_fail(take(), code, text.c_str())); }
    explicit operator bool() const noexcept { return r_ != nullptr; }
    // True once the caller's connection has closed: the answer would reach nobody.
    bool cancelled() const noexcept { return r_ != nullptr && tw_responder_cancelled(r_); }

private:
    tw_responder* take() {
        if (r_ == nullptr) throw Error(TW_ALREADY_USED, "already_used: this call was already answered");
        return std::exchange(r_, nullptr);
    }
    tw_responder* r_;
};

// A baidu_std server over mTLS. Register handlers, start, stop; the destructor stops it.
class Server {
public:
    // Runs on one of trustwire's runtime threads and must not block. Answer through
    // `responder` before returning, or move it away and answer later from any thread (the
    // Call stays valid until then). An exception from the handler answers EINTERNAL (2001)
    // with its text, unless the responder was already moved or used.
    using Handler = std::function<void(const Call&, Responder&)>;
    // Answers inline with the returned payload.
    using InlineHandler = std::function<std::string(const Call&)>;

    explicit Server(const Profile& profile) {
        tw_server* s = nullptr;
        detail::check(tw_server_new(profile.get(), &s));
        server_.reset(s);
    }
    Server& handle(const std::string& service, const std::string& method, Handler handler) {
        auto slot = std::make_unique<Handler>(std::move(handler));
        detail::check(tw_server_register(server_.get(), service.c_str(), method.c_str(), &Server::dispatch, slot.get()));
        handlers_.push_back(std::move(slot));
        return *this;
    }
    Server& handle_inline(const std::string& service, const std::string& method, InlineHandler handler) {
        return handle(service, method, [h = std::move(handler)](const Call& call, Responder& responder) {
            responder.send(h(call));
        });
    }
    // Binds `address` (port 0: any free port) and serves; returns the bound port.
    uint16_t start(const std::string& address = "127.0.0.1:0") {
        uint16_t port = 0;
        detail::check(tw_server_start(server_.get(), address.c_str(), &port));
        return port;
    }
    uint16_t port() const { return tw_server_port(server_.get()); }
    // Graceful stop: calls in flight finish (up to the grace), no handler is called after.
    void stop() { detail::check(tw_server_stop(server_.get())); }

private:
    static void dispatch(void* user_data, const tw_call* call, tw_responder* r) noexcept {
        Responder responder(r);
        try {
            (*static_cast<Handler*>(user_data))(Call(call), responder);
        } catch (const std::exception& e) {
            try {
                if (responder) responder.fail(2001, e.what());
            } catch (...) {
            }
        } catch (...) {
            try {
                if (responder) responder.fail(2001, "the handler threw a non-standard exception");
            } catch (...) {
            }
        }
    }

    // Declared first, destroyed last: the server is freed (and stopped) before its handlers.
    std::vector<std::unique_ptr<Handler>> handlers_;
    detail::Handle<tw_server, tw_server_free> server_;
};

struct CallOptions {
    uint32_t timeout_ms = 0;  // 0: the client default (30 s)
    std::string attachment;
    std::optional<int64_t> log_id;
};

struct Reply {
    std::string payload;
    std::string attachment;
};

// A client for one server address; connects on the first call, any thread. Synchronous calls
// from up to 8 threads at a time go over a connection of each thread's own (see tw_client).
class Client {
public:
    // Called once when an asynchronous call ends, on a runtime thread (must not block): TW_OK
    // and the reply, or the failure and its message.
    using Done = std::function<void(tw_result result, Reply reply, const std::string& error)>;

    Client(const Profile& profile, const std::string& address) {
        tw_client* c = nullptr;
        detail::check(tw_client_new(profile.get(), address.c_str(), &c));
        client_.reset(c);
    }
    // Blocks until the answer; throws Error on failure.
    Reply call(const std::string& service, const std::string& method, std::string_view payload,
               const CallOptions& options = {}) const {
        auto opts = make_options(options);
        tw_response* r = nullptr;
        detail::check(tw_client_call(client_.get(), service.c_str(), method.c_str(), detail::bytes(payload), payload.size(),
                                     opts.get(), &r));
        detail::Handle<tw_response, tw_response_free> response(r);
        return reply_of(response.get());
    }
    void call_async(const std::string& service, const std::string& method, std::string_view payload,
                    const CallOptions& options, Done done) const {
        auto opts = make_options(options);
        auto slot = std::make_unique<Done>(std::move(done));
        detail::check(tw_client_call_async(client_.get(), service.c_str(), method.c_str(), detail::bytes(payload),
                                           payload.size(), opts.get(), &Client::complete, slot.get()));
        slot.release();  // owned by the callback from here on
    }
    void close() { detail::check(tw_client_close(client_.get())); }

private:
    using Options = detail::Handle<tw_call_options, tw_call_options_free>;

    static Options make_options(const CallOptions& o) {
        if (o.timeout_ms == 0 && o.attachment.empty() && !o.log_id) return Options();
        tw_call_options* p = nullptr;
        detail::check(tw_call_options_new(&p));
        Options opts(p);
        if (o.timeout_ms != 0) detail::check(tw_call_options_set_timeout_ms(p, o.timeout_ms));
        if (!o.attachment.empty())
            detail::check(tw_call_options_set_attachment(p, detail::bytes(o.attachment), o.attachment.size()));
        if (o.log_id) detail::check(tw_call_options_set_log_id(p, *o.log_id));
        return opts;
    }

    static Reply reply_of(const tw_response* r) {
        size_t n = 0, m = 0;
        const uint8_t* p = tw_response_payload(r, &n);
        const uint8_t* a = tw_response_attachment(r, &m);
        return Reply{std::string(detail::view(p, n)), std::string(detail::view(a, m))};
    }

    static void complete(void* user_data, tw_result result, const tw_response* response) noexcept {
        std::unique_ptr<Done> done(static_cast<Done*>(user_data));
        try {
            (*done)(result, reply_of(response), std::string(detail::view(tw_response_error_message(response))));
        } catch (...) {
        }
    }

    detail::Handle<tw_client, tw_client_free> client_;
};

// What a valid identity token says about the caller.
struct TokenIdentity {
    std::string spiffe_id;  // empty when the caller's certificate has none
    uint64_t not_after;     // the caller's certificate not-after, Unix seconds
};

// Verifies a token a server-side trustwire proxy wrote into authentication_data, for `audience`
// (the name of the proxy route in front of this service) and no older than `max_age_seconds`;
// throws Error (verdict() "token_bad_mac", "token_unknown_key", "token_wrong_audience",
// "token_too_old", "token_expired", "token_unsupported_version", "token_bad_format", …).
inline TokenIdentity verify_identity_token(std::string_view token, const std::string& key_id, std::string_view secret,
                                           const std::string& audience,
                                           uint64_t max_age_seconds = TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS) {
    char id[2048];
    uint64_t not_after = 0;
    detail::check(tw_identity_token_verify_for(detail::bytes(token), token.size(), key_id.c_str(),
                                               detail::bytes(secret), secret.size(), audience.c_str(),
                                               max_age_seconds, id, sizeof id, &not_after));
    return TokenIdentity{id, not_after};
}

// Proxy routes from a `trustwire proxy` config file, running inside this process.
class Proxy {
public:
    explicit Proxy(const std::string& config_path) {
        tw_proxy* p = nullptr;
        detail::check(tw_proxy_start(config_path.c_str(), &p));
        proxy_.reset(p);
    }
    // (route name, listen address) pairs.
    std::vector<std::pair<std::string, std::string>> routes() const {
        std::vector<std::pair<std::string, std::string>> out;
        for (size_t i = 0, n = tw_proxy_route_count(proxy_.get()); i < n; i++)
            out.emplace_back(tw_proxy_route_name(proxy_.get(), i), tw_proxy_route_address(proxy_.get(), i));
        return out;
    }
    void reload() { detail::check(tw_proxy_reload(proxy_.get())); }
    // Graceful drain (the config's drain_seconds).
    void stop() { detail::check(tw_proxy_stop(proxy_.get())); }

private:
    detail::Handle<tw_proxy, tw_proxy_free> proxy_;
};

}  // namespace trustwire

#endif
