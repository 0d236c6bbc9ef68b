/* C tests of the key services outside the process (PKCS#11 on SoftHSM2,
 * AWS KMS on moto) through the JSON configuration, run by tests/ffi_c.rs
 * under AddressSanitizer and UndefinedBehaviorSanitizer.
 *
 * PANSEAL_BACKEND_CONFIG names the configuration file (the README's text,
 * ffi/tests/c/configs/key_services.jsonc, with the test's paths);
 * PANSEAL_BACKEND_SEALED a file for the sealed PANs. One run per mode
 * (argv[1]):
 *   seal  seals 50 PANs (rows row-0..row-49) and writes them to the file;
 *         opens them in this process, and with another row; blind index if
 *         the backend offers it; rotate_dek and a seal/open after it.
 *   open  a new process with a new client from the same configuration
 *         opens the 50 PANs from the file, and none with another row.
 *   bad   configurations that must fail: a PIN inline (PANSEAL_BAD_PIN is
 *         the would-be PIN: never in an error), an unknown key service, a
 *         missing module file (PANSEAL_BAD_MODULE), an unset pin_env
 *         variable, AWS credentials inline.
 * Lines "<what>: N of M" are the figures tests/ffi_c.rs asserts. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "panseal.h"

#define COUNT 50

static int failures = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static const char *env(const char *name) {
    const char *v = getenv(name);
    if (v == NULL) {
        fprintf(stderr, "%s is not set\n", name);
        exit(2);
    }
    return v;
}

/* The i-th test PAN: 16 digits "4000 00ii iiii iiic" with a Luhn check digit. */
static void pan_for(int i, char out[17]) {
    snprintf(out, 17, "400000%09d", i);
    int sum = 0;
    for (int k = 14; k >= 0; k--) {
        int d = out[k] - '0';
        if ((14 - k) % 2 == 0) {
            d *= 2;
            if (d > 9) d -= 9;
        }
        sum += d;
    }
    out[15] = (char)('0' + (10 - sum % 10) % 10);
    out[16] = 0;
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

static panseal_client *client_from_file(const char *path) {
    panseal_client *c = NULL;
    panseal_result r = panseal_client_new_from_file(path, &c);
    if (r != PANSEAL_OK) {
        char err[512];
        last_error(err, sizeof err);
        fprintf(stderr, "panseal_client_new_from_file: %d %s\n", (int)r, err);
        exit(1);
    }
    return c;
}

/* Opens `sealed` bound to `row`; 1 if it opened to `expected`. */
static int opens(const panseal_client *c, const char *sealed, const char *row,
                 const char *expected) {
    panseal_context ctx = ctx_for(row);
    char pan[PANSEAL_PAN_BUFFER];
    size_t pan_len = 0;
    panseal_result r =
        panseal_open(c, (const uint8_t *)sealed, strlen(sealed), &ctx, "c-test",
                     "backend-test", pan, sizeof pan, &pan_len, NULL);
    if (r == PANSEAL_OK) return strcmp(pan, expected) == 0;
    CHECK(r == PANSEAL_DECRYPTION_FAILED);
    return 0;
}

static int run_seal(const char *config, const char *sealed_path) {
    panseal_client *c = client_from_file(config);
    static char sealed[COUNT][PANSEAL_SEALED_TEXT_BUFFER];
    char pan[17], row[32], other[32];
    int opened = 0, moved = 0;
    FILE *f = fopen(sealed_path, "w");
    CHECK(f != NULL);
    if (f == NULL) return 1;
    for (int i = 0; i < COUNT; i++) {
        pan_for(i, pan);
        snprintf(row, sizeof row, "row-%d", i);
        panseal_context ctx = ctx_for(row);
        size_t len = 0;
        CHECK(panseal_seal(c, (const uint8_t *)pan, strlen(pan), &ctx, sealed[i],
                           sizeof sealed[i], &len) == PANSEAL_OK);
        CHECK(len == 64 && strstr(sealed[i], pan) == NULL);
        fprintf(f, "%d %s\n", i, sealed[i]);
    }
    fclose(f);
    for (int i = 0; i < COUNT; i++) {
        pan_for(i, pan);
        snprintf(row, sizeof row, "row-%d", i);
        snprintf(other, sizeof other, "row-%d", i + 1);
        opened += opens(c, sealed[i], row, pan);
        moved += opens(c, sealed[i], other, pan);
    }
    printf("sealed: %d of %d\n", COUNT, COUNT);
    printf("opened by the sealing client: %d of %d\n", opened, COUNT);
    printf("opened with another row: %d of %d\n", moved, COUNT);

    /* Blind index: deterministic per PAN, different across PANs. */
    char a[PANSEAL_INDEX_BUFFER], b[PANSEAL_INDEX_BUFFER], d[PANSEAL_INDEX_BUFFER];
    size_t n = 0;
    uint32_t version = 0;
    char p0[17], p1[17];
    pan_for(0, p0);
    pan_for(1, p1);
    panseal_result r = panseal_blind_index(c, (const uint8_t *)p0, 16, a, sizeof a, &n, &version);
    if (r == PANSEAL_OK) {
        CHECK(n == 64 && version >= 1);
        CHECK(panseal_blind_index(c, (const uint8_t *)p0, 16, b, sizeof b, &n, NULL) == PANSEAL_OK);
        CHECK(panseal_blind_index(c, (const uint8_t *)p1, 16, d, sizeof d, &n, NULL) == PANSEAL_OK);
        CHECK(strcmp(a, b) == 0 && strcmp(a, d) != 0);
        printf("blind index: version %u\n", (unsigned)version);
    } else {
        char err[512];
        last_error(err, sizeof err);
        printf("blind index: not offered (%d %s)\n", (int)r, err);
    }

    /* A new DEK after rotation; the old ciphertexts still open. */
    CHECK(panseal_rotate_dek(c) == PANSEAL_OK);
    char after[PANSEAL_SEALED_TEXT_BUFFER];
    size_t len = 0;
    panseal_context ctx = ctx_for("row-after");
    CHECK(panseal_seal(c, (const uint8_t *)p0, 16, &ctx, after, sizeof after, &len) == PANSEAL_OK);
    int ok = opens(c, after, "row-after", p0) + opens(c, sealed[0], "row-0", p0);
    printf("opened after rotate_dek: %d of 2\n", ok);
    panseal_client_free(c);
    return 0;
}

static int run_open(const char *config, const char *sealed_path) {
    panseal_client *c = client_from_file(config);
    FILE *f = fopen(sealed_path, "r");
    CHECK(f != NULL);
    if (f == NULL) return 1;
    int i = 0, read = 0, opened = 0, moved = 0;
    char text[128], pan[17], row[32], other[32];
    while (fscanf(f, "%d %127s", &i, text) == 2) {
        read++;
        pan_for(i, pan);
        snprintf(row, sizeof row, "row-%d", i);
        snprintf(other, sizeof other, "row-%d", i + 1);
        opened += opens(c, text, row, pan);
        moved += opens(c, text, other, pan);
    }
    fclose(f);
    printf("opened by a new process: %d of %d\n", opened, read);
    printf("opened by a new process with another row: %d of %d\n", moved, read);
    panseal_client_free(c);
    return 0;
}

/* A configuration that must fail with `expected`, its error naming `want`
 * and never containing `secret`. */
static void refused(const char *json, panseal_result expected, const char *want,
                    const char *secret, const char *what) {
    panseal_client *c = NULL;
    panseal_result r = panseal_client_new(json, &c);
    char err[1024];
    last_error(err, sizeof err);
    CHECK(r == expected);
    CHECK(c == NULL);
    CHECK(strstr(err, want) != NULL);
    if (secret != NULL) CHECK(strstr(err, secret) == NULL);
    printf("refused %s: %d (%s)\n", what, (int)r, r == expected ? "as expected" : "WRONG");
    if (r != expected || strstr(err, want) == NULL) fprintf(stderr, "%s: %d %s\n", what, (int)r, err);
    panseal_client_free(c);
}

static int run_bad(void) {
    const char *pin = env("PANSEAL_BAD_PIN");
    const char *module = env("PANSEAL_BAD_MODULE");
    char json[2048];
    const char *head =
        "{\"environment\": \"test\", \"scope\": \"merchant-1\","
        " \"key_store\": {\"type\": \"memory\"}, \"audit\": {\"type\": \"memory\"},"
        " \"key_service\": ";
    snprintf(json, sizeof json,
             "%s{\"type\": \"pkcs11\", \"module\": \"%s\", \"token\": \"payments\","
             " \"kek\": \"cards\", \"pin\": \"%s\"}}",
             head, module, pin);
    refused(json, PANSEAL_CONFIG_ERROR, "pin_file", pin, "inline PIN");
    snprintf(json, sizeof json,
             "%s{\"type\": \"pkcs11\", \"module\": \"%s\", \"token\": \"payments\","
             " \"kek\": \"cards\", \"pin_env\": \"PANSEAL_PKCS11_PIN\", \"pin\": 4711081542}}",
             head, module);
    refused(json, PANSEAL_CONFIG_ERROR, "pin_env", "4711081542", "inline PIN (a number) beside pin_env");
    snprintf(json, sizeof json, "%s{\"type\": \"hsm\"}}", head);
    refused(json, PANSEAL_CONFIG_ERROR, "`pkcs11`", NULL, "unknown key service");
    snprintf(json, sizeof json,
             "%s{\"type\": \"pkcs11\", \"module\": \"%s.missing\", \"token\": \"payments\","
             " \"kek\": \"cards\", \"pin_env\": \"PANSEAL_PKCS11_PIN\"}}",
             head, module);
    refused(json, PANSEAL_CONFIG_ERROR, ".missing does not exist", NULL, "missing module");
    snprintf(json, sizeof json,
             "%s{\"type\": \"pkcs11\", \"module\": \"%s\", \"token\": \"payments\","
             " \"kek\": \"cards\", \"pin_env\": \"PANSEAL_C_TEST_UNSET_PIN\"}}",
             head, module);
    refused(json, PANSEAL_CONFIG_ERROR, "PANSEAL_C_TEST_UNSET_PIN (pin_env) is not set", NULL,
            "unset pin_env");
    snprintf(json, sizeof json,
             "%s{\"type\": \"aws-kms\", \"kek\": \"cards\", \"region\": \"eu-west-1\","
             " \"secret_access_key\": \"%s\"}}",
             head, pin);
    refused(json, PANSEAL_CONFIG_ERROR, "AWS_PROFILE", pin, "inline AWS secret");
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test_backends seal|open|bad\n");
        return 2;
    }
    int rc;
    if (strcmp(argv[1], "seal") == 0) {
        rc = run_seal(env("PANSEAL_BACKEND_CONFIG"), env("PANSEAL_BACKEND_SEALED"));
    } else if (strcmp(argv[1], "open") == 0) {
        rc = run_open(env("PANSEAL_BACKEND_CONFIG"), env("PANSEAL_BACKEND_SEALED"));
    } else {
        rc = run_bad();
    }
    if (rc != 0 || failures != 0) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C backend tests passed (%s)\n", argv[1]);
    return 0;
}
