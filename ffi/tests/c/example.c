/* The README's C example (scripts/readme.py checks that the README block is
 * the region between the markers), compiled and run by ffi/tests/ffi_c.rs and
 * by scripts/test.sh against the installed library. */
/* readme:begin c-example */
#include <stdio.h>
#include <string.h>
#include "panseal.h"

int main(void) {
    const char *config =
        "{\"environment\":\"dev\",\"scope\":\"merchant-42\","
        "\"key_service\":{\"type\":\"local\"},\"key_store\":{\"type\":\"memory\"},"
        "\"audit\":{\"type\":\"jsonl\",\"path\":\"audit.jsonl\"}}";
    panseal_client *client = NULL;
    char msg[256];
    size_t n = 0;
    if (panseal_client_new(config, &client) != PANSEAL_OK) {
        panseal_last_error(msg, sizeof msg, &n);
        fprintf(stderr, "panseal: %s\n", msg);
        return 1;
    }
    panseal_context row = {(const uint8_t *)"cards", 5, (const uint8_t *)"pan", 3,
                           (const uint8_t *)"card-1001", 9};
    const char *pan = "4111 1111 1111 1111";
    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    if (panseal_seal(client, (const uint8_t *)pan, strlen(pan), &row,
                     sealed, sizeof sealed, &n) != PANSEAL_OK) return 1;
    printf("store in VARCHAR(64): %s\n", sealed);

    char digits[PANSEAL_PAN_BUFFER];
    bool reseal = false;
    panseal_result r = panseal_open(client, (const uint8_t *)sealed, n, &row,
                                    "agent-7", "refund", digits, sizeof digits,
                                    &n, &reseal);
    if (r != PANSEAL_OK) {
        panseal_last_error(msg, sizeof msg, &n);
        fprintf(stderr, "open failed (%u): %s\n", (unsigned)r, msg);
    } else {
        /* use digits, then wipe them */
        memset(digits, 0, sizeof digits);
    }
    panseal_client_free(client);
    return r == PANSEAL_OK ? 0 : 1;
}
/* readme:end c-example */
