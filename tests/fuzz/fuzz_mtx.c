// Fuzz the 10x MatrixMarket folder reader. The input describes a folder:
//
//   byte 0           flags: 1 matrix.mtx.gz (else matrix.mtx), 2 features.tsv
//                    (CellRanger v3; else genes.tsv, v2), 4 the .tsv files
//                    gzipped, 8 also read labels.tsv (part 4) as --labels,
//                    16 with the label column 'celltype' (else the first)
//   then, separated by NUL bytes: matrix.mtx, barcodes.tsv, genes/features.tsv
//   and, optionally, labels.tsv (barcode<TAB>label)
//
// Missing parts are empty files. Seeds: tests/fuzz/corpus/mtx/ (scanpy's
// CellRanger 1.2.0 chr21 folder; the first cells of its 3.0.0 folder and of
// pbmc3k's folder, with pbmc3k's labels).
#include "fuzz_input.h"

#include <zlib.h>

static void write_part(const char *dir, const char *name, int gz, const uint8_t *p, size_t n) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s%s", dir, name, gz ? ".gz" : "");
    if (!gz) {
        fuzz_write(path, p, n);
        return;
    }
    gzFile f = gzopen(path, "wb1");
    FUZZ_REQUIRE(f, "cannot write %s", path);
    FUZZ_REQUIRE(n == 0 || gzwrite(f, p, (unsigned)n) == (int)n, "short write to %s", path);
    FUZZ_REQUIRE(gzclose(f) == Z_OK, "cannot close %s", path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char dir[4200], labels[4300];
    if (!ready) {
        fuzz_h5_init();
        fuzz_path(dir, sizeof dir, "mtx");
        snprintf(labels, sizeof labels, "%s/labels.tsv", fuzz_tmp());
        ready = 1;
    }
    if (size < 1 || size > (1u << 20)) return 0;
    unsigned flags = data[0];
    const uint8_t *part[4] = {0};
    size_t len[4] = {0};
    size_t n_parts = 0, start = 1;
    for (size_t i = 1; i <= size && n_parts < 4; i++) {
        if (i == size || (data[i] == 0 && n_parts < 3)) {
            part[n_parts] = data + start;
            len[n_parts++] = i - start;
            start = i + 1;
        }
    }
    fuzz_rm_tree(dir);
    FUZZ_REQUIRE(mkdir(dir, 0700) == 0, "cannot create %s: %s", dir, strerror(errno));
    write_part(dir, "matrix.mtx", flags & 1, part[0], len[0]);
    write_part(dir, "barcodes.tsv", flags & 4, part[1], len[1]);
    write_part(dir, flags & 2 ? "features.tsv" : "genes.tsv", flags & 4, part[2], len[2]);
    InputOptions opt = {0};
    if (flags & 8) {
        fuzz_write(labels, part[3], len[3]);
        opt.labels_tsv = labels;
        opt.label_key = (flags & 16) ? "celltype" : NULL;
    }
    fuzz_input_read(dir, &opt);
    fuzz_h5_done("the MatrixMarket reader");
    return 0;
}
