// The C++ wrapper end to end in one process: a server with inline, asynchronous, throwing and
// identity-reading handlers; sync and async calls; refusals as exceptions with verdict names;
// rotation events; move semantics. Built with -std=c++17 -Wall -Wextra -Werror and run under
// ASan/UBSan by bindings/c/tests/c_programs.rs.
#include <trustwire.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            std::exit(1);                                                      \
        }                                                                      \
    } while (0)

using trustwire::Error;

// Runs `f`, expecting an Error with `verdict`; returns it.
template <class F>
static Error expect_error(F f, const char* verdict) {
    try {
        f();
    } catch (const Error& e) {
        if (std::string(e.verdict()) != verdict) {
            std::fprintf(stderr, "expected %s, got %s: %s\n", verdict, e.verdict(), e.what());
            std::exit(1);
        }
        return e;
    }
    std::fprintf(stderr, "expected an error %s, got none\n", verdict);
    std::exit(1);
}

static trustwire::Profile profile(const trustwire::DevCa& ca, const trustwire::Credential& c,
                                  const std::vector<std::string>& allow = {}) {
    trustwire::ProfileBuilder b;
    b.identity_pem(c.cert_pem, c.key_pem).trust_pem(ca.cert_pem());
    for (const auto& a : allow) b.allow(a);
    return b.build();
}

int main() {
    CHECK(trustwire::version() == TW_VERSION_STRING);
    trustwire::DevCa ca("example.org");
    auto server_cred = ca.issue("server", std::string("spiffe://example.org/server"), {"localhost", "127.0.0.1"});
    auto client_cred = ca.issue("client", std::string("spiffe://example.org/client"));
    auto intruder_cred = ca.issue("intruder", std::string("spiffe://example.org/intruder"));

    auto server_profile = profile(ca, server_cred, {"spiffe://example.org/client"});
    trustwire::Server server(server_profile);

    // Calls answered from a thread of the test's own.
    std::mutex lock;
    std::condition_variable ready;
    std::vector<std::pair<std::string, trustwire::Responder>> queue;
    bool stopping = false;
    std::thread worker([&] {
        std::unique_lock<std::mutex> guard(lock);
        for (;;) {
            ready.wait(guard, [&] { return stopping || !queue.empty(); });
            if (queue.empty()) return;
            auto item = std::move(queue.back());
            queue.pop_back();
            guard.unlock();
            CHECK(!item.second.cancelled());  // its caller is still waiting
            item.second.send("later:" + item.first);
            guard.lock();
        }
    });

    server.handle_inline("example.EchoService", "Echo", [](const trustwire::Call& call) { return std::string(call.payload()); })
        .handle("example.EchoService", "Later",
                [&](const trustwire::Call& call, trustwire::Responder& responder) {
                    std::lock_guard<std::mutex> guard(lock);
                    queue.emplace_back(std::string(call.payload()), std::move(responder));
                    ready.notify_one();
                })
        .handle_inline("example.EchoService", "Throw",
                       [](const trustwire::Call&) -> std::string { throw std::runtime_error("no such record"); })
        .handle_inline("example.EchoService", "WhoAmI", [](const trustwire::Call& call) {
            auto peer = call.peer();
            CHECK(peer.fingerprint_sha256().size() == 64);
            CHECK(peer.not_after() > 0);
            return std::string(peer.spiffe_id().value_or("none"));
        })
        .handle("example.EchoService", "Attach", [](const trustwire::Call& call, trustwire::Responder& responder) {
            std::string log_id = call.log_id() ? std::to_string(*call.log_id()) : "none";
            responder.send(log_id, call.attachment());
            // A second answer is a defined error, not a crash.
            expect_error([&] { responder.send("again"); }, "already_used");
        });
    uint16_t port = server.start();
    CHECK(port != 0 && server.port() == port);
    std::string addr = "127.0.0.1:" + std::to_string(port);

    auto client_profile = profile(ca, client_cred);
    trustwire::Client client(client_profile, addr);
    CHECK(client.call("example.EchoService", "Echo", "hello").payload == "hello");
    CHECK(client.call("example.EchoService", "Later", "x").payload == "later:x");
    CHECK(client.call("example.EchoService", "WhoAmI", "").payload == "spiffe://example.org/client");
    trustwire::CallOptions opts;
    opts.attachment = "att";
    opts.log_id = 7;
    opts.timeout_ms = 5000;
    auto reply = client.call("example.EchoService", "Attach", "", opts);
    CHECK(reply.payload == "7" && reply.attachment == "att");

    auto e = expect_error([&] { client.call("example.EchoService", "Throw", ""); }, "rpc_error");
    CHECK(e.rpc_code() == 2001 && std::string(e.what()).find("no such record") != std::string::npos);
    e = expect_error([&] { client.call("example.EchoService", "Missing", ""); }, "rpc_error");
    CHECK(e.rpc_code() == 1002);

    // Asynchronous calls, all in flight at once.
    std::atomic<int> done{0}, ok{0};
    for (int i = 0; i < 200; i++) {
        std::string payload = "call-" + std::to_string(i);
        client.call_async("example.EchoService", i % 2 ? "Echo" : "Later", payload, {},
                          [&, i](tw_result r, trustwire::Reply reply, const std::string& error) {
                              std::string want = (i % 2 ? "" : "later:") + std::string("call-") + std::to_string(i);
                              if (r == TW_OK && reply.payload == want) ok++;
                              else std::fprintf(stderr, "call %d: %s %s\n", i, tw_result_name(r), error.c_str());
                              done++;
                          });
    }
    for (int waited = 0; done < 200 && waited < 30000; waited += 5)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    CHECK(done == 200 && ok == 200);

    // A peer outside the allow-list is refused at the handshake.
    auto intruder_profile = profile(ca, intruder_cred);
    trustwire::Client intruder(intruder_profile, addr);
    e = expect_error([&] { intruder.call("example.EchoService", "Echo", "x"); }, "peer_alert");
    CHECK(std::string(e.what()).find("access_denied") != std::string::npos);

    // Rotation through the wrapper, with events.
    std::atomic<int> reloaded{0}, rejected{0};
    client_profile.on_event([&](const tw_event& ev) {
        if (ev.kind == TW_EVENT_RELOADED) reloaded++;
        if (ev.kind == TW_EVENT_REJECTED && ev.verdict == TW_KEY_MISMATCH) rejected++;
    });
    auto next = ca.issue("client", std::string("spiffe://example.org/client"));
    CHECK(client_profile.set_identity_pem(next.cert_pem, next.key_pem) == 2);
    expect_error([&] { client_profile.set_identity_pem(next.cert_pem, client_cred.key_pem); }, "key_mismatch");
    for (int waited = 0; (reloaded < 1 || rejected < 1) && waited < 10000; waited += 5)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    CHECK(reloaded == 1 && rejected == 1);
    CHECK(client_profile.generation() == 2);

    // Bad settings name what is wrong.
    expect_error([] { trustwire::ProfileBuilder().allow("nonsense"); }, "invalid_config");
    expect_error([] { trustwire::ProfileBuilder().build(); }, "invalid_config");

    // Moved-from handles are empty; their destructors are safe, and using them is an error.
    trustwire::Client moved = std::move(client);
    CHECK(moved.call("example.EchoService", "Echo", "still").payload == "still");
    expect_error([&] { client.call("example.EchoService", "Echo", "x"); }, "null_argument");  // NOLINT(bugprone-use-after-move)
    trustwire::Profile moved_profile = std::move(client_profile);
    CHECK(moved_profile.generation() == 2);

    // Identity tokens: a malformed one is refused by name.
    expect_error([] { trustwire::verify_identity_token("garbage", "k1", "secret", "echo-in"); }, "token_bad_format");
    CHECK(trustwire::metrics_text().find("trustwire_") != std::string::npos);

    server.stop();
    {
        std::lock_guard<std::mutex> guard(lock);
        stopping = true;
    }
    ready.notify_one();
    worker.join();
    std::printf("wrapper_test: all passed\n");
    return 0;
}
