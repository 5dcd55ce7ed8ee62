// Calls example.EchoService/Echo over mTLS with the C++ wrapper (trustwire.hpp).
//
//   c++ -std=c++17 -I ../c echo_client.cpp $(pkg-config --cflags --libs trustwire) -o echo_client
//   (from a checkout, `make examples` builds it as target/release/examples-c/echo_client_cpp)
//   ./echo_client client.toml localhost:8443 "hello"
#include <cstring>
#include <iostream>
#include <string>

#include <trustwire.hpp>

#include "echo_pb.h"  // EchoRequest/EchoResponse by hand; a real service uses protoc's classes

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: " << argv[0] << " PROFILE.toml HOST:PORT MESSAGE\n";
        return 2;
    }
    try {
        auto profile = trustwire::Profile::load_file(argv[1]);
        trustwire::Client client(profile, argv[2]);
        uint8_t request[1024];
        size_t n = echo_encode(argv[3], std::strlen(argv[3]), request, sizeof request);
        trustwire::CallOptions options;
        options.timeout_ms = 5000;
        auto reply = client.call("example.EchoService", "Echo", std::string_view(reinterpret_cast<const char*>(request), n), options);
        const char* message = nullptr;
        size_t len = 0;
        if (echo_decode(reinterpret_cast<const uint8_t*>(reply.payload.data()), reply.payload.size(), &message, &len) != 0) {
            std::cerr << "the answer is not an EchoResponse\n";
            return 1;
        }
        std::cout << std::string(message, len) << "\n";
    } catch (const trustwire::Error& e) {
        // e.verdict(): peer_alert, name_mismatch, rpc_error (e.rpc_code()), timeout, ...
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
