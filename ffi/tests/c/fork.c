/* fork() after a seal through the C ABI, as a pre-fork server (gunicorn,
 * uWSGI, PHP-FPM, Python multiprocessing) does: the parent makes one client,
 * seals once, forks CHILDREN children, and then parent and children each
 * seal SEALS PANs and write the text forms, one per line, to
 * fork-<who>.txt in the current directory. tests/ffi_fork.rs counts the
 * repeated nonces and the DEKs shared between processes.
 *
 * A child leaves with _exit and does not free the inherited client: its
 * runtime's threads exist only in the parent. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "panseal.h"

#define CHILDREN 4
#define SEALS 2000

static const char *CONFIG =
    "{\"environment\": \"test\", \"scope\": \"merchant-1\","
    " \"key_service\": {\"type\": \"local\"},"
    " \"key_store\": {\"type\": \"memory\"},"
    " \"audit\": {\"type\": \"memory\"}}";

static const char *PAN = "4111111111111111";

static int seal_into(const panseal_client *c, FILE *out, int n) {
    char row[32];
    char sealed[PANSEAL_SEALED_TEXT_BUFFER];
    for (int i = 0; i < n; i++) {
        snprintf(row, sizeof row, "row-%d", i);
        panseal_context ctx;
        ctx.table = (const uint8_t *)"cards";
        ctx.table_len = 5;
        ctx.column = (const uint8_t *)"pan";
        ctx.column_len = 3;
        ctx.row_key = (const uint8_t *)row;
        ctx.row_key_len = strlen(row);
        size_t len = 0;
        if (panseal_seal(c, (const uint8_t *)PAN, strlen(PAN), &ctx, sealed,
                         sizeof sealed, &len) != PANSEAL_OK) {
            char msg[256];
            size_t mlen = 0;
            panseal_last_error(msg, sizeof msg, &mlen);
            fprintf(stderr, "seal %d failed: %s\n", i, msg);
            return 1;
        }
        fprintf(out, "%s\n", sealed);
    }
    return 0;
}

static int seal_to_file(const panseal_client *c, const char *who, int n) {
    char path[64];
    snprintf(path, sizeof path, "fork-%s.txt", who);
    FILE *out = fopen(path, "w");
    if (out == NULL) {
        perror(path);
        return 1;
    }
    int rc = seal_into(c, out, n);
    if (fclose(out) != 0) rc = 1;
    return rc;
}

int main(void) {
    panseal_client *c = NULL;
    if (panseal_client_new(CONFIG, &c) != PANSEAL_OK) {
        fprintf(stderr, "client_new failed\n");
        return 1;
    }
    /* One seal before forking: the DEK is active and the nonce generator has
     * run. */
    if (seal_to_file(c, "before", 1) != 0) return 1;

    pid_t pids[CHILDREN];
    for (int i = 0; i < CHILDREN; i++) {
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            alarm(120);
            char who[16];
            snprintf(who, sizeof who, "child-%d", i);
            _exit(seal_to_file(c, who, SEALS));
        }
        pids[i] = pid;
    }
    int failed = seal_to_file(c, "parent", SEALS);
    for (int i = 0; i < CHILDREN; i++) {
        int status = 0;
        if (waitpid(pids[i], &status, 0) != pids[i] || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child %d failed (status %d)\n", i, status);
            failed = 1;
        }
    }
    panseal_client_free(c);
    if (failed) return 1;
    printf("fork: parent and %d children sealed\n", CHILDREN);
    return 0;
}
