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
// Use it in a brpc server that only listens on loopback behind `trustwire proxy`:
//
//   static TrustwireAuthenticator auth("k1", secret_bytes);
//   brpc::ServerOptions options;
//   options.auth = &auth;
//   server.Start("127.0.0.1:8000", &options);
//
// In a handler, the caller's SPIFFE ID is cntl->auth_context()->user().
#pragma once

#include <brpc/authenticator.h>

#include <string>

class TrustwireAuthenticator : public brpc::Authenticator {
public:
    TrustwireAuthenticator(std::string key_id, std::string secret)
        : key_id_(std::move(key_id)), secret_(std::move(secret)) {}

    // Servers never generate credentials; the proxy does.
    int GenerateCredential(std::string* /*auth_str*/) const override { return -1; }

    // brpc calls this with the first request's authentication_data on a connection.
    int VerifyCredential(const std::string& auth_str,
                         const butil::EndPoint& client_addr,
                         brpc::AuthContext* out_ctx) const override;

private:
    std::string key_id_;
    std::string secret_;
};
