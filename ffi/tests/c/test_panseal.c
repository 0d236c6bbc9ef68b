/* C tests of the panseal ABI: round trip, wrong context, bad input, small
 * buffers, NULL handling, last-error hygiene (cleared on success),
 * concurrent use of one handle from several threads, and closing a handle
 * while other threads are inside calls on it. Built with -Wall -Wextra -Werror and run
 * under AddressSanitizer and UndefinedBehaviorSanitizer by tests/ffi_c.rs. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "panseal.h"

static int failures = 0;
#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static const char *CONFIG =
    "{\"environment\": \"test\", \"scope\": \"merchant-1\","
    " \"key_service\": {\"type\": \"local\"},"
    " \"key_store\": {\"type\": \"memory\"},"
    " \"audit\": {\"type\": \"memory\"}}";

static const char *PAN = "4111111111111111";

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

static void test_round_trip(const panseal_client *c) {
    panseal_context ctx = ctx_for("row-1");
    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    size_t sealed_len = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, &sealed_len) == PANSEAL_OK);
    CHECK(sealed_len == 64);
    CHECK(strlen(sealed) == 64);
    CHECK(strncmp(sealed, "P1", 2) == 0);
    CHECK(strstr(sealed, PAN) == NULL);

    char pan[PANSEAL_PAN_BUFFER];
    size_t pan_len = 0;
    bool reseal = true;
    CHECK(panseal_open(c, (const uint8_t *)sealed, sealed_len, &ctx, "c-test",
                       "round-trip", pan, sizeof pan, &pan_len,
                       &reseal) == PANSEAL_OK);
    CHECK(pan_len == 16);
    CHECK(strcmp(pan, PAN) == 0);
    CHECK(!reseal);

    /* Binary form. */
    uint8_t bin[PANSEAL_SEALED_BINARY_LEN];
    size_t bin_len = 0;
    CHECK(panseal_seal_binary(c, (const uint8_t *)"5555 5555 5555 4444", 19, &ctx,
                              bin, sizeof bin, &bin_len) == PANSEAL_OK);
    CHECK(bin_len == 48);
    CHECK(bin[0] == 1);
    CHECK(panseal_open(c, bin, bin_len, &ctx, "c-test", "round-trip", pan,
                       sizeof pan, &pan_len, NULL) == PANSEAL_OK);
    CHECK(strcmp(pan, "5555555555554444") == 0);
}

static void test_wrong_context_and_bad_input(const panseal_client *c) {
    panseal_context ctx = ctx_for("row-1");
    panseal_context other = ctx_for("row-2");
    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    size_t sealed_len = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, &sealed_len) == PANSEAL_OK);
    char pan[PANSEAL_PAN_BUFFER] = "untouched";
    size_t pan_len = 0;
    CHECK(panseal_open(c, (const uint8_t *)sealed, sealed_len, &other, "c-test",
                       "wrong-context", pan, sizeof pan, &pan_len,
                       NULL) == PANSEAL_DECRYPTION_FAILED);
    CHECK(strcmp(pan, "untouched") == 0);
    char msg[256];
    last_error(msg, sizeof msg);
    CHECK(strcmp(msg, "decryption failed") == 0);

    /* Flip one character of the text form. */
    sealed[40] = sealed[40] == 'A' ? 'B' : 'A';
    CHECK(panseal_open(c, (const uint8_t *)sealed, sealed_len, &ctx, "c-test",
                       "tampered", pan, sizeof pan, &pan_len,
                       NULL) == PANSEAL_DECRYPTION_FAILED);
    /* Malformed ciphertexts. */
    CHECK(panseal_open(c, (const uint8_t *)"P1short", 7, &ctx, "c-test", "bad",
                       pan, sizeof pan, &pan_len,
                       NULL) == PANSEAL_MALFORMED_CIPHERTEXT);
    uint8_t junk[48] = {9};
    CHECK(panseal_open(c, junk, sizeof junk, &ctx, "c-test", "bad", pan,
                       sizeof pan, &pan_len, NULL) == PANSEAL_MALFORMED_CIPHERTEXT);

    /* Bad PANs: Luhn, track data, letters; the message never echoes. */
    const char *bad[] = {"4111111111111112", ";4111111111111111=25121010?",
                         "4111x11111111111", "123"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(panseal_seal(c, (const uint8_t *)bad[i], strlen(bad[i]), &ctx,
                           sealed, sizeof sealed,
                           &sealed_len) == PANSEAL_INVALID_PAN);
        last_error(msg, sizeof msg);
        CHECK(strlen(msg) > 0);
        CHECK(strstr(msg, "411111") == NULL);
    }
    /* Empty table name. */
    panseal_context empty = ctx;
    empty.table_len = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &empty, sealed,
                       sizeof sealed, &sealed_len) == PANSEAL_INVALID_CONTEXT);
    /* Non-UTF-8 column. */
    panseal_context bad_utf8 = ctx;
    bad_utf8.column = (const uint8_t *)"\xff\xfe";
    bad_utf8.column_len = 2;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &bad_utf8, sealed,
                       sizeof sealed, &sealed_len) == PANSEAL_INVALID_ARGUMENT);
}

static void test_buffers_and_nulls(const panseal_client *c) {
    panseal_context ctx = ctx_for("row-9");
    char small[10] = "untouched";
    size_t need = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, small,
                       sizeof small, &need) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(need == PANSEAL_SEALED_TEXT_BUFFER);
    CHECK(strcmp(small, "untouched") == 0);
    /* Exactly 64 bytes is one too few for the NUL. */
    char almost[64];
    memset(almost, 'x', sizeof almost);
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, almost,
                       sizeof almost, &need) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(almost[0] == 'x' && almost[63] == 'x');

    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    size_t sealed_len = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, &sealed_len) == PANSEAL_OK);
    char pan[8] = "keep";
    CHECK(panseal_open(c, (const uint8_t *)sealed, sealed_len, &ctx, "c-test",
                       "small", pan, sizeof pan, &need,
                       NULL) == PANSEAL_BUFFER_TOO_SMALL);
    CHECK(need == PANSEAL_PAN_BUFFER);
    CHECK(strcmp(pan, "keep") == 0);

    char masked[PANSEAL_PAN_BUFFER];
    CHECK(panseal_mask((const uint8_t *)PAN, strlen(PAN), PANSEAL_MASK_BIN6_LAST_FOUR,
                       masked, sizeof masked, &need) == PANSEAL_OK);
    CHECK(strcmp(masked, "411111******1111") == 0);
    CHECK(panseal_mask((const uint8_t *)PAN, strlen(PAN), 99, masked,
                       sizeof masked, &need) == PANSEAL_INVALID_ARGUMENT);

    char index[PANSEAL_INDEX_BUFFER];
    uint32_t version = 0;
    CHECK(panseal_blind_index(c, (const uint8_t *)PAN, strlen(PAN), index,
                              sizeof index, &need, &version) == PANSEAL_OK);
    CHECK(need == 64 && strlen(index) == 64 && version == 1);

    /* NULLs everywhere are refused, not crashed on. */
    CHECK(panseal_seal(NULL, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, &need) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_seal(c, NULL, 16, &ctx, sealed, sizeof sealed, &need) ==
          PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), NULL, sealed,
                       sizeof sealed, &need) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, NULL) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_open(c, (const uint8_t *)sealed, sealed_len, &ctx, NULL, "x",
                       pan, sizeof pan, &need, NULL) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_rotate_dek(NULL) == PANSEAL_NULL_ARGUMENT);
    panseal_client *none = NULL;
    CHECK(panseal_client_new(NULL, &none) == PANSEAL_NULL_ARGUMENT);
    CHECK(panseal_client_new("{not json", &none) == PANSEAL_CONFIG_ERROR);
    CHECK(none == NULL);
    panseal_client_free(NULL);
}

/* The last error belongs to the last call: a success clears it, so a
 * caller never reads a stale message as the reason for a later result. */
static void test_last_error_cleared_on_success(const panseal_client *c) {
    panseal_context ctx = ctx_for("row-e");
    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    size_t n = 0;
    CHECK(panseal_seal(c, (const uint8_t *)"4111111111111112", 16, &ctx, sealed,
                       sizeof sealed, &n) == PANSEAL_INVALID_PAN);
    char msg[256] = "";
    size_t len = 99;
    CHECK(panseal_last_error(msg, sizeof msg, &len) == PANSEAL_OK);
    CHECK(len > 0 && strlen(msg) == len);
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                       sizeof sealed, &n) == PANSEAL_OK);
    strcpy(msg, "stale");
    len = 99;
    CHECK(panseal_last_error(msg, sizeof msg, &len) == PANSEAL_OK);
    CHECK(len == 0);
    CHECK(msg[0] == 0);
    /* Also after an entry point that needs no client. */
    char masked[PANSEAL_PAN_BUFFER];
    CHECK(panseal_mask((const uint8_t *)"12", 2, PANSEAL_MASK_LAST_FOUR, masked,
                       sizeof masked, &n) == PANSEAL_INVALID_PAN);
    CHECK(panseal_mask((const uint8_t *)PAN, strlen(PAN), PANSEAL_MASK_LAST_FOUR,
                       masked, sizeof masked, &n) == PANSEAL_OK);
    len = 99;
    CHECK(panseal_last_error(msg, sizeof msg, &len) == PANSEAL_OK);
    CHECK(len == 0 && msg[0] == 0);
}

static void test_rotation(const panseal_client *c) {
    panseal_context ctx = ctx_for("row-r");
    char before[PANSEAL_SEALED_TEXT_BUFFER], after[PANSEAL_SEALED_TEXT_BUFFER];
    size_t n = 0;
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, before,
                       sizeof before, &n) == PANSEAL_OK);
    CHECK(panseal_rotate_dek(c) == PANSEAL_OK);
    CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, after,
                       sizeof after, &n) == PANSEAL_OK);
    /* Different DEK id: bytes 2..10 differ, so the first 13 chars do. */
    CHECK(strncmp(before, after, 13) != 0);
    char pan[PANSEAL_PAN_BUFFER];
    bool reseal = false;
    CHECK(panseal_open(c, (const uint8_t *)before, 64, &ctx, "c-test", "rotation",
                       pan, sizeof pan, &n, &reseal) == PANSEAL_OK);
    CHECK(reseal);
}

struct worker {
    const panseal_client *client;
    int id;
    int errors;
};

static void *work(void *arg) {
    struct worker *w = arg;
    char row[32];
    for (int i = 0; i < 200; i++) {
        snprintf(row, sizeof row, "t%d-%d", w->id, i);
        panseal_context ctx = ctx_for(row);
        char sealed[PANSEAL_SEALED_TEXT_BUFFER];
        char pan[PANSEAL_PAN_BUFFER];
        size_t n = 0;
        if (panseal_seal(w->client, (const uint8_t *)PAN, strlen(PAN), &ctx,
                         sealed, sizeof sealed, &n) != PANSEAL_OK ||
            panseal_open(w->client, (const uint8_t *)sealed, n, &ctx, "thread",
                         "concurrency", pan, sizeof pan, &n, NULL) != PANSEAL_OK ||
            strcmp(pan, PAN) != 0) {
            w->errors++;
        }
    }
    return NULL;
}

static void test_threads(const panseal_client *c) {
    enum { N = 8 };
    pthread_t threads[N];
    struct worker workers[N];
    for (int i = 0; i < N; i++) {
        workers[i].client = c;
        workers[i].id = i;
        workers[i].errors = 0;
        CHECK(pthread_create(&threads[i], NULL, work, &workers[i]) == 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(threads[i], NULL);
        CHECK(workers[i].errors == 0);
    }
}

/* panseal_client_close while other threads are inside calls on the handle:
 * their calls finish (right answer) or return PANSEAL_CLIENT_CLOSED; no
 * use-after-free (ASan); later calls refuse; free afterwards is clean. */
struct racer {
    const panseal_client *client;
    int id;
    int ok;
    int closed;
    int other;
};

static void *race(void *arg) {
    struct racer *w = arg;
    char row[32];
    for (int i = 0; i < 1000000; i++) {
        snprintf(row, sizeof row, "r%d-%d", w->id, i);
        panseal_context ctx = ctx_for(row);
        char sealed[PANSEAL_SEALED_TEXT_BUFFER];
        char pan[PANSEAL_PAN_BUFFER];
        size_t n = 0;
        panseal_result r = panseal_seal(w->client, (const uint8_t *)PAN, strlen(PAN),
                                        &ctx, sealed, sizeof sealed, &n);
        if (r == PANSEAL_OK)
            r = panseal_open(w->client, (const uint8_t *)sealed, n, &ctx, "racer",
                             "close-race", pan, sizeof pan, &n, NULL);
        if (r == PANSEAL_OK && strcmp(pan, PAN) == 0) {
            w->ok++;
        } else if (r == PANSEAL_CLIENT_CLOSED) {
            w->closed++;
            return NULL;
        } else {
            w->other++;
            return NULL;
        }
    }
    return NULL;
}

static void test_close_while_calling(void) {
    enum { ROUNDS = 20, N = 4 };
    int ok = 0;
    for (int round = 0; round < ROUNDS; round++) {
        panseal_client *c = NULL;
        CHECK(panseal_client_new(CONFIG, &c) == PANSEAL_OK);
        if (!c) return;
        pthread_t threads[N];
        struct racer racers[N];
        for (int i = 0; i < N; i++) {
            racers[i] = (struct racer){c, i, 0, 0, 0};
            CHECK(pthread_create(&threads[i], NULL, race, &racers[i]) == 0);
        }
        struct timespec pause = {0, 1000000L * (round % 5)};
        nanosleep(&pause, NULL);
        CHECK(panseal_client_close(c) == PANSEAL_OK);
        CHECK(panseal_client_close(c) == PANSEAL_OK); /* idempotent */
        for (int i = 0; i < N; i++) {
            pthread_join(threads[i], NULL);
            CHECK(racers[i].other == 0);
            CHECK(racers[i].closed == 1);
            ok += racers[i].ok;
        }
        panseal_context ctx = ctx_for("after");
        char sealed[PANSEAL_SEALED_TEXT_BUFFER];
        size_t n = 0;
        CHECK(panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                           sizeof sealed, &n) == PANSEAL_CLIENT_CLOSED);
        char msg[64];
        last_error(msg, sizeof msg);
        CHECK(strcmp(msg, "client is closed") == 0);
        panseal_client_free(c);
    }
    CHECK(ok > 0);
    CHECK(panseal_client_close(NULL) == PANSEAL_NULL_ARGUMENT);
}

int main(void) {
    CHECK(strlen(panseal_version()) > 0);
    panseal_client *c = NULL;
    panseal_result r = panseal_client_new(CONFIG, &c);
    if (r != PANSEAL_OK) {
        char msg[512];
        last_error(msg, sizeof msg);
        fprintf(stderr, "client_new failed: %u %s\n", (unsigned)r, msg);
        return 1;
    }
    test_round_trip(c);
    test_wrong_context_and_bad_input(c);
    test_buffers_and_nulls(c);
    test_last_error_cleared_on_success(c);
    test_rotation(c);
    test_threads(c);
    panseal_client_free(c);
    test_close_while_calling();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C ABI tests passed\n");
    return 0;
}
