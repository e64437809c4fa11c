// bin/perfcell: pretraining, fine-tuning, prediction and embeddings.
#include "perfcell/error.h"
#include "perfcell/log.h"
#include "perfcell/mpienv.h"
#include "perfcell/pretrain.h"
#include "perfcell/zstd_filter.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static const char USAGE[] =
    "usage: perfcell COMMAND [options]\n"
    "\n"
    "Commands:\n"
    "  pretrain   masked-expression (and contrastive) pretraining; run under mpirun\n"
    "  finetune   cell-type fine-tuning from a pretrained checkpoint; run under mpirun\n"
    "  predict    annotate cells with a fine-tuned checkpoint\n"
    "  embed      write cell embeddings (.h5ad, obsm['X_perfcell'])\n"
    "\n"
    "`perfcell COMMAND --help` describes each command.\n";

typedef struct {
    const char *name;
    int (*fn)(int argc, char **argv);
} Command;

static const Command COMMANDS[] = {
    {"pretrain", cmd_pretrain},
    {"finetune", cmd_finetune},
    {"predict", cmd_predict},
    {"embed", cmd_embed},
};

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++) {
        if (strcmp(argv[1], COMMANDS[i].name) != 0) continue;
        mpienv_init(&argc, &argv);
        // A file-size limit (ulimit -f) must fail a write with EFBIG, so that
        // the error path removes the temporary output, not kill the process.
        signal(SIGXFSZ, SIG_IGN);
        CHECK_OK(zstd_filter_register());
        int rc = COMMANDS[i].fn(argc - 2, argv + 2);
        mpienv_finalize();
        return rc;
    }
    fprintf(stderr, "perfcell: unknown command '%s'\n\n%s", argv[1], USAGE);
    return 2;
}
