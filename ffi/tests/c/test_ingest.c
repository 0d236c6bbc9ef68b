/* C tests of the write-only ingest ABI (panseal_ingest_*): a front end that
 * holds only a scope's ingest public key. Built with -Wall -Wextra -Werror
 * and run under AddressSanitizer and UndefinedBehaviorSanitizer by
 * tests/ffi_c.rs, which generates the key pair and passes, in the
 * environment:
 *
 *   PANSEAL_INGEST_PUBLIC_KEY    the public key (PIK1/... text form)
 *   PANSEAL_INGEST_FINGERPRINT   its fingerprint (64 hex digits)
 *   PANSEAL_INGEST_OTHER_KEY     another valid public key (an attacker's)
 *   PANSEAL_INGEST_OFF_CURVE_KEY a public key whose point is not on P-256
 *
 * The ciphertexts are printed one per line, "text <i> <I1...>" and
 * "binary <i> <hex>" (PAN i of PANS[], row key "row-<i>"), and
 * "attacker <...>" for anything sealed under the substituted key; the
 * Rust side opens them with the private key. No PAN is ever printed. */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "panseal.h"

static int failures = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            failures++;                                                      \
        }                                                                    \
    } while (0)

/* Keep in the same order as INGEST_PANS in tests/ffi_c.rs. */
static const char *PANS[] = {
    "4111111111111111",    "5555555555554444", "378282246310005",
    "371449635398431",     "6011111111111117", "3056930009020004",
    "36227206271667",      "4222222222222",    "6200000000000005",
    "5200828282828210",    "4000056655665556", "6011000990139424",
    "4000000000000000006", "500000000009",     "4111 1111 1111 1111",
    "5555-5555-5555-4444",
};
enum { N_PANS = sizeof PANS / sizeof PANS[0] };
/* Sealed by THREADS threads at once with one handle, PANS[i % N_PANS] at
 * row "row-<i>" for i in N_PANS..N_PANS + THREADS * PER_THREAD. */
enum { THREADS = 4, PER_THREAD = 25 };

static const char *need_env(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v) {
        fprintf(stderr, "%s is not set\n", name);
        exit(2);
    }
    return v;
}

static panseal_context ctx_for(const char *row) {
    panseal_context c;
    c.table = (const uint8_t *)"cards";
    c.table_len = 5;
    c.column = (const uint8_t *)"pan";
    c.column_len = 3;
    c.row_key = (const uint8_t *)row;
    c.row_key_len = strlen(row);
    return c;
}

static void last_error(char *buf, size_t cap) {
    size_t n = 0;
    if (panseal_last_error(buf, cap, &n) != PANSEAL_OK) buf[0] = 0;
}

/* True if `msg` holds a run of 6 or more digits (a PAN fragment). */
static int has_digit_run(const char *msg) {
    int run = 0;
    for (const char *p = msg; *p; p++) {
        run = isdigit((unsigned char)*p) ? run + 1 : 0;
        if (run >= 6) return 1;
    }
    return 0;
}

static panseal_ingest_sealer *new_sealer(const char *key, panseal_result *r) {
    panseal_ingest_sealer *s = NULL;
    *r = panseal_ingest_sealer_new((const uint8_t *)key, strlen(key), &s);
    return s;
}

static int base64url_only(const char *s) {
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_') return 0;
    return 1;
}

static void test_seal_text_and_binary(const panseal_ingest_sealer *s) {
    char row[32];
    for (int i = 0; i < N_PANS; i++) {
        snprintf(row, sizeof row, "row-%d", i);
        panseal_context ctx = ctx_for(row);
        char text[PANSEAL_INGEST_TEXT_BUFFER];
        size_t n = 0;
        panseal_result r = panseal_ingest_seal(s, (const uint8_t *)PANS[i],
                                               strlen(PANS[i]), &ctx, text,
                                               sizeof text, &n);
        CHECK(r == PANSEAL_OK);
        if (r != PANSEAL_OK) continue;
        CHECK(n == 134);
        CHECK(strlen(text) == 134);
        CHECK(strncmp(text, "I1", 2) == 0);
        CHECK(base64url_only(text));
        CHECK(strstr(text, PANS[i]) == NULL);
        printf("text %d %s\n", i, text);

        uint8_t bin[PANSEAL_INGEST_BINARY_LEN];
        r = panseal_ingest_seal_binary(s, (const uint8_t *)PANS[i], strlen(PANS[i]),
                                       &ctx, bin, sizeof bin, &n);
        CHECK(r == PANSEAL_OK);
        if (r != PANSEAL_OK) continue;
        CHECK(n == 101);
        CHECK(bin[0] == 0x01 && bin[1] == 0x02);
        printf("binary %d ", i);
        for (size_t k = 0; k < n; k++) printf("%02x", bin[k]);
        printf("\n");
    }
    /* The same PAN at the same row seals differently each time (fresh
     * ephemeral key): equal ciphertexts reveal no equal PANs. */
    panseal_context ctx = ctx_for("row-0");
    char a[PANSEAL_INGEST_TEXT_BUFFER], b[PANSEAL_INGEST_TEXT_BUFFER];
    size_t n = 0;
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx,
                              a, sizeof a, &n) == PANSEAL_OK);
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx,
                              b, sizeof b, &n) == PANSEAL_OK);
    CHECK(strcmp(a, b) != 0);
    /* ...but the header (key tag and version) is the same. */
    CHECK(strncmp(a, b, 12) == 0);
}

struct worker {
    const panseal_ingest_sealer *sealer;
    int first;
    int errors;
    char out[PER_THREAD][PANSEAL_INGEST_TEXT_BUFFER];
};

static void *work(void *arg) {
    struct worker *w = arg;
    char row[32];
    for (int k = 0; k < PER_THREAD; k++) {
        int i = w->first + k;
        snprintf(row, sizeof row, "row-%d", i);
        panseal_context ctx = ctx_for(row);
        const char *pan = PANS[i % N_PANS];
        size_t n = 0;
        if (panseal_ingest_seal(w->sealer, (const uint8_t *)pan, strlen(pan), &ctx,
                                w->out[k], sizeof w->out[k], &n) != PANSEAL_OK ||
            n != 134)
            w->errors++;
    }
    return NULL;
}

static void test_threads(const panseal_ingest_sealer *s) {
    static struct worker workers[THREADS];
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) {
        workers[t].sealer = s;
        workers[t].first = N_PANS + t * PER_THREAD;
        workers[t].errors = 0;
        CHECK(pthread_create(&threads[t], NULL, work, &workers[t]) == 0);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        CHECK(workers[t].errors == 0);
        for (int k = 0; k < PER_THREAD; k++)
            printf("text %d %s\n", workers[t].first + k, workers[t].out[k]);
    }
}

static void test_bad_public_keys(const char *off_curve) {
    panseal_result r;
    char msg[256];
    /* A point not on P-256, handed over by the Rust side ... */
    panseal_ingest_sealer *s = new_sealer(off_curve, &r);
    CHECK(r == PANSEAL_INVALID_PUBLIC_KEY);
    CHECK(s == NULL);
    last_error(msg, sizeof msg);
    CHECK(strcmp(msg, "ingest public key is not a point on P-256") == 0);
    /* ... and (0, 0), which no curve with b != 0 contains. */
    char zero[160] = "PIK1/test/merchant-1/7/BA";
    size_t at = strlen(zero);
    memset(zero + at, 'A', 85);
    zero[at + 85] = 0;
    CHECK(strlen(zero) == strlen("PIK1/test/merchant-1/7/") + 87);
    s = new_sealer(zero, &r);
    CHECK(r == PANSEAL_INVALID_PUBLIC_KEY && s == NULL);
    /* A point of the wrong length (the SEC1 identity, one zero byte). */
    s = new_sealer("PIK1/test/merchant-1/7/AA", &r);
    CHECK(r == PANSEAL_INVALID_PUBLIC_KEY && s == NULL);

    /* Malformed text. */
    const char *malformed[] = {
        "",
        "garbage",
        "PIK2/test/merchant-1/7/BAAA",
        "PIK1/test/merchant-1/seven/BAAA",
        "PIK1/test/merchant-1/7/not*base64",
        "PIK1/test/merchant 1/7/BAAA",
        "PIK1/test/merchant-1/7/BAAA/extra",
        "PIK1/test/merchant-1/7",
    };
    for (size_t i = 0; i < sizeof malformed / sizeof malformed[0]; i++) {
        /* *sealer_out must stay untouched on failure. */
        static char sentinel;
        panseal_ingest_sealer *before = (panseal_ingest_sealer *)(void *)&sentinel;
        s = before;
        r = panseal_ingest_sealer_new((const uint8_t *)malformed[i],
                                      strlen(malformed[i]), &s);
        CHECK(r == PANSEAL_MALFORMED_PUBLIC_KEY);
        CHECK(s == before);
        last_error(msg, sizeof msg);
        CHECK(strncmp(msg, "ingest public key text is malformed", 35) == 0);
    }
    s = NULL;
    CHECK(panseal_ingest_sealer_new((const uint8_t *)"PIK1/\xff\xfe", 7, &s) ==
          PANSEAL_MALFORMED_PUBLIC_KEY);
    CHECK(s == NULL);
    last_error(msg, sizeof msg);
    CHECK(strcmp(msg, "ingest public key text is malformed: not UTF-8") == 0);
}

static void test_pinning(const char *key, const char *fingerprint,
                         const char *other) {
    panseal_ingest_sealer *s = NULL;
    /* The right key and its pin (either case). */
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key),
                                           (const uint8_t *)fingerprint,
                                           strlen(fingerprint), &s) == PANSEAL_OK);
    CHECK(s != NULL);
    char fp[PANSEAL_FINGERPRINT_BUFFER];
    size_t n = 0;
    CHECK(panseal_ingest_sealer_fingerprint(s, fp, sizeof fp, &n) == PANSEAL_OK);
    CHECK(n == 64 && strcmp(fp, fingerprint) == 0);
    char small[64];
    CHECK(panseal_ingest_sealer_fingerprint(s, small, sizeof small, &n) ==
          PANSEAL_BUFFER_TOO_SMALL);
    CHECK(n == PANSEAL_FINGERPRINT_BUFFER);
    panseal_ingest_sealer_free(s);
    char upper[65];
    for (int i = 0; i < 64; i++) upper[i] = (char)toupper((unsigned char)fingerprint[i]);
    upper[64] = 0;
    s = NULL;
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key),
                                           (const uint8_t *)upper, 64,
                                           &s) == PANSEAL_OK);
    panseal_ingest_sealer_free(s);

    /* The attacker substitutes their own public key in the front end's
     * configuration; the pinned fingerprint refuses it, so nothing is ever
     * sealed to it. Whatever does get sealed is printed as "attacker" for
     * the Rust side to try with the attacker's private key. */
    s = NULL;
    panseal_result r = panseal_ingest_sealer_new_pinned(
        (const uint8_t *)other, strlen(other), (const uint8_t *)fingerprint,
        strlen(fingerprint), &s);
    CHECK(r == PANSEAL_PUBLIC_KEY_NOT_PINNED);
    CHECK(s == NULL);
    if (s) {
        for (int i = 0; i < N_PANS; i++) {
            char row[32], text[PANSEAL_INGEST_TEXT_BUFFER];
            snprintf(row, sizeof row, "row-%d", i);
            panseal_context ctx = ctx_for(row);
            if (panseal_ingest_seal(s, (const uint8_t *)PANS[i], strlen(PANS[i]),
                                    &ctx, text, sizeof text, &n) == PANSEAL_OK)
                printf("attacker %d %s\n", i, text);
        }
        panseal_ingest_sealer_free(s);
    }
    /* Bad pins. */
    s = NULL;
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key),
                                           (const uint8_t *)fingerprint, 63,
                                           &s) == PANSEAL_INVALID_ARGUMENT);
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key),
                                           (const uint8_t *)"zz", 2,
                                           &s) == PANSEAL_INVALID_ARGUMENT);
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key), NULL,
                                           64, &s) == PANSEAL_NULL_ARGUMENT);
    CHECK(s == NULL);
}

static void test_bad_pans_and_contexts(const panseal_ingest_sealer *s) {
    panseal_context ctx = ctx_for("row-x");
    char text[PANSEAL_INGEST_TEXT_BUFFER] = "untouched";
    size_t n = 0;
    char msg[256];
    const char *bad[] = {"4111111111111112", ";4111111111111111=25121010?",
                         "%B4111111111111111^DOE/JOHN^2512101?",
                         "4111x11111111111", "123", "", "41111111111111111111111",
                         "\xff\xfe\xfd"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(panseal_ingest_seal(s, (const uint8_t *)bad[i], strlen(bad[i]), &ctx,
                                  text, sizeof text, &n) == PANSEAL_INVALID_PAN);
        CHECK(strcmp(text, "untouched") == 0);
        last_error(msg, sizeof msg);
        CHECK(strncmp(msg, "invalid PAN", 11) == 0 || strcmp(msg, "PAN is not UTF-8") == 0);
        CHECK(!has_digit_run(msg));
        CHECK(strstr(msg, "411111") == NULL);
    }
    uint8_t bin[PANSEAL_INGEST_BINARY_LEN];
    CHECK(panseal_ingest_seal_binary(s, (const uint8_t *)bad[0], strlen(bad[0]), &ctx,
                                     bin, sizeof bin, &n) == PANSEAL_INVALID_PAN);
    /* Contexts. */
    panseal_context empty = ctx;
    empty.table_len = 0;
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &empty,
                              text, sizeof text, &n) == PANSEAL_INVALID_CONTEXT);
    panseal_context bad_utf8 = ctx;
    bad_utf8.column = (const uint8_t *)"\xff\xfe";
    bad_utf8.column_len = 2;
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &bad_utf8,
                              text, sizeof text, &n) == PANSEAL_INVALID_ARGUMENT);
    static uint8_t long_row[600];
    memset(long_row, 'r', sizeof long_row);
    panseal_context too_long = ctx;
    too_long.row_key = long_row;
    too_long.row_key_len = sizeof long_row;
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &too_long,
                              text, sizeof text, &n) == PANSEAL_INVALID_CONTEXT);
    CHECK(strcmp(text, "untouched") == 0);
}

static void test_buffers_and_nulls(const panseal_ingest_sealer *s, const char *key) {
    panseal_context ctx = ctx_for("row-b");
    /* 134 bytes is one too few for the NUL: nothing written, 135 stored. */
    char almost[134];
    memset(almost, 'x', sizeof almost);
    size_t need = 0;
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx,
                              almost, sizeof almost, &need) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(need == PANSEAL_INGEST_TEXT_BUFFER);
    CHECK(almost[0] == 'x' && almost[133] == 'x');
    char msg[256];
    last_error(msg, sizeof msg);
    CHECK(strcmp(msg, "buffer too small: 135 bytes needed") == 0);
    uint8_t bin[100];
    memset(bin, 0xAA, sizeof bin);
    CHECK(panseal_ingest_seal_binary(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx,
                                     bin, sizeof bin, &need) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(need == PANSEAL_INGEST_BINARY_LEN);
    CHECK(bin[0] == 0xAA && bin[99] == 0xAA);
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx, NULL,
                              0, &need) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(need == PANSEAL_INGEST_TEXT_BUFFER);

    /* NULLs are refused, not crashed on. */
    char text[PANSEAL_INGEST_TEXT_BUFFER];
    CHECK(panseal_ingest_seal(NULL, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx,
                              text, sizeof text, &need) == PANSEAL_NULL_ARGUMENT);
    last_error(msg, sizeof msg);
    CHECK(strcmp(msg, "sealer is NULL") == 0);
    CHECK(panseal_ingest_seal(s, NULL, 16, &ctx, text, sizeof text, &need) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), NULL, text,
                              sizeof text, &need) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx, text,
                              sizeof text, NULL) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_seal_binary(NULL, (const uint8_t *)PANS[0], strlen(PANS[0]),
                                     &ctx, bin, sizeof bin, &need) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_sealer_fingerprint(NULL, text, sizeof text, &need) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_sealer_fingerprint(s, text, sizeof text, NULL) ==
          PANSEAL_NULL_ARGUMENT);
    panseal_ingest_sealer *none = NULL;
    CHECK(panseal_ingest_sealer_new(NULL, 10, &none) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_sealer_new((const uint8_t *)key, strlen(key), NULL) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_ingest_sealer_new_pinned((const uint8_t *)key, strlen(key),
                                           (const uint8_t *)"00", 2, NULL) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(none == NULL);
    panseal_ingest_sealer_free(NULL);

    /* A success clears the last error. */
    CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[0], strlen(PANS[0]), &ctx, text,
                              sizeof text, &need) == PANSEAL_OK);
    size_t len = 99;
    CHECK(panseal_last_error(msg, sizeof msg, &len) == PANSEAL_OK);
    CHECK(len == 0 && msg[0] == 0);
}

/* What else a front end's process could try with its own means: the DEK
 * client's open path does not take ingest ciphertexts (and a front end
 * has no client). Counts how many of its own ciphertexts it can open. */
/* The README's C ingest block (scripts/readme.py checks that it is the
 * region below), with the key and pin the test was given; the text it seals
 * is printed as "readme 0 ..." for the Rust side to open. */
static int readme_fragment(const char *public_key, const char *pin, const char *pan) {
    size_t pan_len = strlen(pan);
    panseal_context row = ctx_for("card-1001");
    /* readme:begin c-ingest */
    /* public_key: the PIK1/... text a custodian published (IngestPublicKey::to_text),
     * pin: its fingerprint, built into the front end's deployment. */
    panseal_ingest_sealer *sealer = NULL;
    if (panseal_ingest_sealer_new_pinned((const uint8_t *)public_key, strlen(public_key),
                                         (const uint8_t *)pin, 64, &sealer) != PANSEAL_OK)
        return 1; /* PANSEAL_MALFORMED_PUBLIC_KEY, _INVALID_PUBLIC_KEY (not on P-256),
                     _PUBLIC_KEY_NOT_PINNED (a substituted key) */
    char stored[PANSEAL_INGEST_TEXT_BUFFER]; /* 134 characters + NUL: VARCHAR(140) */
    size_t n = 0;
    panseal_result r = panseal_ingest_seal(sealer, (const uint8_t *)pan, pan_len, &row,
                                           stored, sizeof stored, &n);
    panseal_ingest_sealer_free(sealer);
    /* readme:end c-ingest */
    if (r != PANSEAL_OK || n != 134) return 1;
    printf("readme 0 %s\n", stored);
    return 0;
}

static int opened_without_private_key(const panseal_ingest_sealer *s) {
    const char *config =
        "{\"environment\": \"test\", \"scope\": \"merchant-1\","
        " \"key_service\": {\"type\": \"local\"},"
        " \"key_store\": {\"type\": \"memory\"},"
        " \"audit\": {\"type\": \"memory\"}}";
    panseal_client *c = NULL;
    CHECK(panseal_client_new(config, &c) == PANSEAL_OK);
    if (!c) return -1;
    int opened = 0;
    for (int i = 0; i < N_PANS; i++) {
        char row[32];
        snprintf(row, sizeof row, "row-%d", i);
        panseal_context ctx = ctx_for(row);
        char text[PANSEAL_INGEST_TEXT_BUFFER];
        uint8_t bin[PANSEAL_INGEST_BINARY_LEN];
        size_t n = 0, m = 0;
        char pan[PANSEAL_PAN_BUFFER];
        CHECK(panseal_ingest_seal(s, (const uint8_t *)PANS[i], strlen(PANS[i]), &ctx,
                                  text, sizeof text, &n) == PANSEAL_OK);
        CHECK(panseal_ingest_seal_binary(s, (const uint8_t *)PANS[i], strlen(PANS[i]),
                                         &ctx, bin, sizeof bin, &m) == PANSEAL_OK);
        if (panseal_open(c, (const uint8_t *)text, n, &ctx, "front-end", "attack", pan,
                         sizeof pan, &n, NULL) == PANSEAL_OK)
            opened++;
        if (panseal_open(c, bin, m, &ctx, "front-end", "attack", pan, sizeof pan, &n,
                         NULL) == PANSEAL_OK)
            opened++;
    }
    panseal_client_free(c);
    return opened;
}

int main(void) {
    const char *key = need_env("PANSEAL_INGEST_PUBLIC_KEY");
    const char *fingerprint = need_env("PANSEAL_INGEST_FINGERPRINT");
    const char *other = need_env("PANSEAL_INGEST_OTHER_KEY");
    const char *off_curve = need_env("PANSEAL_INGEST_OFF_CURVE_KEY");

    panseal_result r;
    panseal_ingest_sealer *s = new_sealer(key, &r);
    if (r != PANSEAL_OK || !s) {
        char msg[512];
        last_error(msg, sizeof msg);
        fprintf(stderr, "ingest_sealer_new failed: %u %s\n", (unsigned)r, msg);
        return 1;
    }
    test_seal_text_and_binary(s);
    test_threads(s);
    test_bad_public_keys(off_curve);
    test_pinning(key, fingerprint, other);
    test_bad_pans_and_contexts(s);
    test_buffers_and_nulls(s, key);
    CHECK(readme_fragment(key, fingerprint, PANS[0]) == 0);
    int opened = opened_without_private_key(s);
    printf("opened without the private key: %d of %d\n", opened, 2 * N_PANS);
    CHECK(opened == 0);
    panseal_ingest_sealer_free(s);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C ingest ABI tests passed\n");
    return 0;
}
