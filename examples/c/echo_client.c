/* Calls example.EchoService/Echo over mTLS: a stock brpc server with ssl_options, or a
 * trustwire one.
 *
 *   cc -std=c11 echo_client.c $(pkg-config --cflags --libs trustwire) -o echo_client
 *   (from a checkout, `make examples` builds it into target/release/examples-c, runnable
 *   there without LD_LIBRARY_PATH)
 *   ./echo_client client.toml localhost:8443 "hello"
 *
 * client.toml is a profile file: identity, trust, and under [client] server_name when the
 * address is not the name on the server's certificate. */
#include <stdio.h>
#include <string.h>

#include <trustwire.h>

#include "echo_pb.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PROFILE.toml HOST:PORT MESSAGE\n", argv[0]);
        return 2;
    }
    tw_profile *profile = NULL;
    tw_client *client = NULL;
    if (tw_profile_load_file(argv[1], &profile) != TW_OK || tw_client_new(profile, argv[2], &client) != TW_OK) {
        fprintf(stderr, "%s\n", tw_last_error_message());
        tw_profile_free(profile);
        return 1;
    }
    uint8_t request[1024];
    size_t n = echo_encode(argv[3], strlen(argv[3]), request, sizeof request);
    tw_call_options *options = NULL;
    tw_call_options_new(&options);
    tw_call_options_set_timeout_ms(options, 5000);
    tw_response *response = NULL;
    tw_result r = tw_client_call(client, "example.EchoService", "Echo", request, n, options, &response);
    int status = 0;
    if (r == TW_OK) {
        size_t size = 0, len = 0;
        const uint8_t *payload = tw_response_payload(response, &size);
        const char *message;
        if (echo_decode(payload, size, &message, &len) == 0) {
            printf("%.*s\n", (int)len, message);
        } else {
            fprintf(stderr, "the answer is not an EchoResponse\n");
            status = 1;
        }
        tw_response_free(response);
    } else {
        /* The message starts with the result's stable name (peer_alert, name_mismatch,
         * rpc_error, timeout, ...; tw_result_name(r)) and says what to fix. */
        fprintf(stderr, "%s\n", tw_last_error_message());
        status = 1;
    }
    tw_call_options_free(options);
    tw_client_free(client);
    tw_profile_free(profile);
    return status;
}
