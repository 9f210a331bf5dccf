/*
 * bw-subscribe: a bucketwire subscriber in plain C against libzmq, for consumers that are not written in Python.
 *
 *   bw-subscribe [-v] [-n COUNT] [-s HUB.key -k CLIENT.key_secret] ENDPOINT TOPIC...
 *
 * Connects a SUB socket to the hub's publish endpoint (ENDPOINT, e.g. tcp://127.0.0.1:5556), subscribes to each
 * TOPIC and prints one line per event on stdout:  TOPIC SEQ ENVELOPE-JSON
 * Heartbeats ([topic, head, empty frame]) are skipped, or printed to stderr with -v ("# heartbeat TOPIC HEAD").
 * -n COUNT exits after COUNT events. With -s and -k the socket is a CURVE client: -s is the hub's public
 * certificate (HUB.key), -k this client's secret certificate (NAME.key_secret), both as written by
 * `bucketwire keys generate` (pyzmq certificate files holding Z85 keys).
 *
 * This is the live stream only: PUB/SUB drops messages when a subscriber falls behind or is disconnected.
 * docs/wire.md describes how to detect a gap from the seq frame and fill it with FETCH on the work endpoint.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define KEY_LEN 40 /* a CURVE key in Z85 */

static volatile sig_atomic_t stopping = 0;

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static void usage(void) {
    fprintf(stderr, "usage: bw-subscribe [-v] [-n COUNT] [-s HUB.key -k CLIENT.key_secret] ENDPOINT TOPIC...\n");
    exit(2);
}

/* Read the Z85 value of `name` ("public-key" or "secret-key") from a pyzmq certificate file:
 *     curve
 *         public-key = "<40 Z85 characters>"
 * Returns 0 on success; on failure prints one line saying what is wrong and returns -1. */
static int read_key(const char *path, const char *name, char out[KEY_LEN + 1]) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "bw-subscribe: cannot read key file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[512];
    int found = -1;
    while (found < 0 && fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t n = strlen(name);
        if (strncmp(p, name, n) != 0) continue;
        p += n;
        while (*p == ' ' || *p == '\t' || *p == '=') p++;
        if (*p != '"') continue;
        p++;
        char *end = strchr(p, '"');
        if (end && end - p == KEY_LEN) {
            memcpy(out, p, KEY_LEN);
            out[KEY_LEN] = '\0';
            found = 0;
        }
    }
    fclose(f);
    if (found < 0)
        fprintf(stderr, "bw-subscribe: %s holds no %s (expected a certificate from `bucketwire keys generate`)\n",
                path, name);
    return found;
}

static int set_key(void *sock, int option, const char *z85, const char *what) {
    if (zmq_setsockopt(sock, option, z85, KEY_LEN) != 0) { /* 40 bytes: Z85 form; 32 would be binary */
        fprintf(stderr, "bw-subscribe: cannot set %s: %s\n", what, zmq_strerror(zmq_errno()));
        return -1;
    }
    return 0;
}

/* Receive one frame into a malloc'd, NUL-terminated buffer; *more says whether another frame follows. */
static char *recv_frame(void *sock, size_t *len, int *more) {
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, sock, 0) < 0) {
        zmq_msg_close(&msg);
        return NULL;
    }
    *len = zmq_msg_size(&msg);
    char *buf = malloc(*len + 1);
    if (!buf) {
        zmq_msg_close(&msg);
        return NULL;
    }
    memcpy(buf, zmq_msg_data(&msg), *len);
    buf[*len] = '\0';
    *more = zmq_msg_more(&msg);
    zmq_msg_close(&msg);
    return buf;
}

int main(int argc, char **argv) {
    const char *server_key_file = NULL, *client_key_file = NULL;
    long count = -1;
    int verbose = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-v")) verbose = 1;
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) count = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "-s") && i + 1 < argc) server_key_file = argv[++i];
        else if (!strcmp(argv[i], "-k") && i + 1 < argc) client_key_file = argv[++i];
        else usage();
    }
    if (argc - i < 2 || (!server_key_file) != (!client_key_file)) usage();
    const char *endpoint = argv[i++];

    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int zero = 0, hwm = 100000;
    zmq_setsockopt(sub, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof hwm);
    if (server_key_file) {
        /* CURVE client: the hub's public key, and this client's keypair (the public half is in the secret
         * certificate too). Must be set before connect. */
        char server_pub[KEY_LEN + 1], client_pub[KEY_LEN + 1], client_sec[KEY_LEN + 1];
        if (!zmq_has("curve")) {
            fprintf(stderr, "bw-subscribe: this libzmq %d.x was built without CURVE; install one with libsodium\n",
                    ZMQ_VERSION_MAJOR);
            return 1;
        }
        if (read_key(server_key_file, "public-key", server_pub) || read_key(client_key_file, "public-key", client_pub)
            || read_key(client_key_file, "secret-key", client_sec))
            return 1;
        if (set_key(sub, ZMQ_CURVE_SERVERKEY, server_pub, "ZMQ_CURVE_SERVERKEY")
            || set_key(sub, ZMQ_CURVE_PUBLICKEY, client_pub, "ZMQ_CURVE_PUBLICKEY")
            || set_key(sub, ZMQ_CURVE_SECRETKEY, client_sec, "ZMQ_CURVE_SECRETKEY"))
            return 1;
        memset(client_sec, 0, sizeof client_sec);
    }
    for (; i < argc; i++) {
        /* The topic frame is the name and a NUL: subscribing to "jobs\0" does not also match "jobs2". */
        size_t n = strlen(argv[i]);
        char *prefix = malloc(n + 1);
        memcpy(prefix, argv[i], n + 1);
        zmq_setsockopt(sub, ZMQ_SUBSCRIBE, prefix, n + 1);
        free(prefix);
    }
    if (zmq_connect(sub, endpoint) != 0) {
        fprintf(stderr, "bw-subscribe: cannot connect to %s: %s\n", endpoint, zmq_strerror(zmq_errno()));
        return 1;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    setvbuf(stdout, NULL, _IOLBF, 0);

    long seen = 0;
    int rc = 0;
    while (!stopping && (count < 0 || seen < count)) {
        /* A message is [topic + NUL, seq as ASCII decimal, envelope JSON]; an empty envelope is a heartbeat
         * whose seq is the topic's head. */
        char *frames[3] = {NULL, NULL, NULL};
        size_t lens[3] = {0, 0, 0};
        int more = 1, n = 0;
        while (more) {
            size_t len;
            char *f = recv_frame(sub, &len, &more);
            if (!f) {
                if (zmq_errno() != EINTR) {
                    fprintf(stderr, "bw-subscribe: receive failed: %s\n", zmq_strerror(zmq_errno()));
                    rc = 1;
                }
                stopping = 1;
                break;
            }
            if (n < 3) {
                frames[n] = f;
                lens[n] = len;
            } else {
                free(f); /* a newer hub may append frames: ignore them */
            }
            n++;
        }
        if (!stopping && n >= 3) {
            if (lens[2] == 0) {
                if (verbose) fprintf(stderr, "# heartbeat %s %s\n", frames[0], frames[1]);
            } else {
                printf("%s %s %s\n", frames[0], frames[1], frames[2]); /* frames[0] stops at its NUL */
                seen++;
            }
        }
        for (int k = 0; k < 3; k++) free(frames[k]);
    }
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return rc;
}
