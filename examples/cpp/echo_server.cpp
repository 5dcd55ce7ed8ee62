// A brpc-compatible example.EchoService over mTLS with the C++ wrapper (trustwire.hpp).
//
//   c++ -std=c++17 -I ../c echo_server.cpp $(pkg-config --cflags --libs trustwire) -o echo_server
//   (from a checkout, `make examples` builds it as target/release/examples-c/echo_server_cpp)
//   ./echo_server server.toml 127.0.0.1:8443        # Ctrl-C stops it gracefully
#include <csignal>
#include <iostream>
#include <string>

#include <trustwire.hpp>

#include "echo_pb.h"  // EchoRequest/EchoResponse by hand; a real service uses protoc's classes

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " PROFILE.toml HOST:PORT\n";
        return 2;
    }
    // Block the stop signals here; the main thread waits for them below, after the server
    // threads have started with them blocked too.
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, nullptr);
    try {
        auto profile = trustwire::Profile::load_file(argv[1]);
        trustwire::Server server(profile);
        server.handle("example.EchoService", "Echo", [](const trustwire::Call& call, trustwire::Responder& responder) {
            auto request = call.payload();
            const char* message = nullptr;
            size_t len = 0;
            if (echo_decode(reinterpret_cast<const uint8_t*>(request.data()), request.size(), &message, &len) != 0) {
                responder.fail(1003 /* EREQUEST */, "EchoRequest does not parse");
                return;
            }
            std::cout << call.peer().spiffe_id().value_or("(no SPIFFE ID)") << " says " << std::string(message, len) << std::endl;
            uint8_t reply[1024];
            size_t n = echo_encode(message, len, reply, sizeof reply);
            if (n == 0) throw std::length_error("message too long for this example");  // answered as EINTERNAL
            responder.send(std::string_view(reinterpret_cast<const char*>(reply), n));
        });
        std::cout << "serving example.EchoService on port " << server.start(argv[2]) << std::endl;
        int sig = 0;
        sigwait(&stop, &sig);
        server.stop();  // calls in flight finish first
        std::cout << "stopped" << std::endl;
    } catch (const trustwire::Error& e) {
        std::cerr << e.what() << "\n";  // starts with e.verdict()
        return 1;
    }
    return 0;
}
