// Built out of tree against an installed trustwire (tests/packaging/run.sh): the C++ wrapper.
#include <iostream>

#include <trustwire.hpp>

int main() {
    trustwire::DevCa ca("example.org");
    auto cred = ca.issue("app", "spiffe://example.org/app", {"localhost"});
    std::cout << "trustwire " << trustwire::version() << " (C++): "
              << (cred.cert_pem.find("BEGIN CERTIFICATE") != std::string::npos ? "ok" : "bad") << "\n";
    return 0;
}
