/* Assertions shared by the C test programs: a failed check prints where, the result's name
 * and this thread's last error message, then exits non-zero. */
#ifndef TW_TEST_CHECK_H
#define TW_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <trustwire.h>

#define FAIL(...)                                                    \
    do {                                                             \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);              \
        fprintf(stderr, __VA_ARGS__);                                \
        fprintf(stderr, "\n");                                       \
        exit(1);                                                     \
    } while (0)

#define CHECK(cond)                                                  \
    do {                                                             \
        if (!(cond)) FAIL("check failed: %s", #cond);                \
    } while (0)

/* Expects `expr` to return `want`; on a mismatch names both results and the last error. */
#define EXPECT(expr, want)                                                             \
    do {                                                                               \
        tw_result got_ = (expr);                                                       \
        if (got_ != (tw_result)(want))                                                 \
            FAIL("%s returned %s, expected %s (last error: %s)", #expr,                \
                 tw_result_name(got_), tw_result_name(want), tw_last_error_message()); \
    } while (0)

#define OK(expr) EXPECT(expr, TW_OK)

#define CHECK_STR(a, b)                                                                \
    do {                                                                               \
        const char *a_ = (a), *b_ = (b);                                               \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0)                           \
            FAIL("%s is \"%s\", expected \"%s\"", #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); \
    } while (0)

#endif
