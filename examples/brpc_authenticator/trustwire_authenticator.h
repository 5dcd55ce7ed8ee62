// A brpc Authenticator that accepts the identity token a trustwire server-side proxy writes into
// each request's authentication_data, and hands the verified caller to the service.
//
// Build notes (on a machine with brpc installed; `make test` only compiles it against stand-ins
// for the two brpc headers it includes):
//
//   make install PREFIX=/usr/local            # in the trustwire tree: libtrustwire + headers
//   g++ -std=c++17 -c trustwire_authenticator.cc $(pkg-config --cflags trustwire)
//   # link the service with: -lbrpc $(pkg-config --libs trustwire) -lgflags -lprotobuf -lssl -lcrypto
//
// Use it in a brpc server that only listens on loopback behind `trustwire proxy`, with the key
// of the route in front of it and the route's name (the token's audience: a token the proxy
// minted for another route, say for another service sharing the key, is refused):
//
//   static TrustwireAuthenticator auth("k1", secret_bytes, "echo-in");
//   brpc::ServerOptions options;
//   options.auth = &auth;
//   server.Start("127.0.0.1:8000", &options);
//
// In a handler, the caller's SPIFFE ID is cntl->auth_context()->user().
#pragma once

#include <brpc/authenticator.h>
#include <trustwire.h>

#include <cstdint>
#include <string>

class TrustwireAuthenticator : public brpc::Authenticator {
public:
    // `max_age_seconds` must match the route's identity_token_max_age_seconds (300 by default).
    TrustwireAuthenticator(std::string key_id, std::string secret, std::string route,
                           uint64_t max_age_seconds = TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS)
        : key_id_(std::move(key_id)),
          secret_(std::move(secret)),
          route_(std::move(route)),
          max_age_seconds_(max_age_seconds) {}

    // Servers never generate credentials; the proxy does.
    int GenerateCredential(std::string* /*auth_str*/) const override { return -1; }

    // brpc calls this with the first request's authentication_data on a connection.
    int VerifyCredential(const std::string& auth_str,
                         const butil::EndPoint& client_addr,
                         brpc::AuthContext* out_ctx) const override;

private:
    std::string key_id_;
    std::string secret_;
    std::string route_;
    uint64_t max_age_seconds_;
};
