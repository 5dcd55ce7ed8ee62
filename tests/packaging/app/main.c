/* Built out of tree against an installed trustwire (tests/packaging/run.sh). */
#include <stdio.h>
#include <string.h>

#include <trustwire.h>

int main(void) {
    if (strcmp(tw_version(), TW_VERSION_STRING) != 0) {
        fprintf(stderr, "header %s, library %s\n", TW_VERSION_STRING, tw_version());
        return 1;
    }
    tw_dev_ca *ca = NULL;
    char *cert = NULL, *key = NULL;
    const char *sans[] = {"localhost"};
    if (tw_dev_ca_new("example.org", &ca) != TW_OK ||
        tw_dev_ca_issue(ca, "app", "spiffe://example.org/app", sans, 1, 0, 0, TW_USAGE_BOTH, &cert, &key) != TW_OK) {
        fprintf(stderr, "%s\n", tw_last_error_message());
        return 1;
    }
    int ok = strstr(cert, "BEGIN CERTIFICATE") != NULL;
    tw_string_free(cert);
    tw_string_free(key);
    tw_dev_ca_free(ca);
    printf("trustwire %s: %s\n", tw_version(), ok ? "ok" : "bad certificate");
    return ok ? 0 : 1;
}
