#include "trustwire_authenticator.h"

#include <butil/logging.h>

int TrustwireAuthenticator::VerifyCredential(const std::string& auth_str,
                                             const butil::EndPoint& client_addr,
                                             brpc::AuthContext* out_ctx) const {
    char spiffe_id[2048];  // SPIFFE IDs are at most 2048 bytes
    uint64_t not_after = 0;
    tw_result r = tw_identity_token_verify_for(
        reinterpret_cast<const uint8_t*>(auth_str.data()), auth_str.size(),
        key_id_.c_str(),
        reinterpret_cast<const uint8_t*>(secret_.data()), secret_.size(),
        route_.c_str(), max_age_seconds_,
        spiffe_id, sizeof spiffe_id, &not_after);
    if (r != TW_OK) {
        // brpc closes the connection. The message starts with the reason's stable name
        // (token_bad_mac, token_unknown_key, token_wrong_audience, token_too_old,
        // token_expired, token_unsupported_version, token_bad_format).
        LOG(WARNING) << "refused caller from " << client_addr << ": " << tw_last_error_message();
        return -1;
    }
    if (spiffe_id[0] == '\0') {
        // The proxy verified the caller's certificate, but it carries no SPIFFE ID to
        // authorize by; this service only admits callers that have one.
        LOG(WARNING) << "refused caller from " << client_addr << ": no SPIFFE ID";
        return -1;
    }
    out_ctx->set_user(spiffe_id);
    out_ctx->set_group("trustwire");
    out_ctx->set_is_service(true);
    return 0;
}
