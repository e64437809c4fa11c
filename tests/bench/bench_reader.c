// Reader throughput: cells per second and rank that the training stream
// delivers (read, Zstandard decompression, decoding, shuffles; prefetch on).
//
//   mpirun -np N bench_reader DIR [--epochs E] [--micro-batch b] [--block B]
//                                 [--prefetch P] [--no-crc]
//
// Prints one line per run: "perfcell_reader ranks N cells C seconds S
// cells_per_s_per_rank R" with R the slowest rank's rate (the step rate of a
// data-parallel run is set by the slowest rank). The time includes opening
// the stream and, with the file check on, the CRC-32 of each shard file.
#include "perfcell/error.h"
#include "perfcell/manifest.h"
#include "perfcell/mpienv.h"
#include "perfcell/stream.h"
#include "perfcell/util.h"

#include <mpi.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    mpienv_init(&argc, &argv);
    int rank = mpienv_rank(), size = mpienv_size();
    if (argc < 2)
        DIE_HINT("mpirun -np N bench_reader DIR [--epochs E] [--micro-batch b] [--block B] "
                 "[--prefetch P]",
                 "no shard folder given");
    long epochs = 10, b = 8, block = 256, prefetch = 8, no_crc = 0;
    for (int i = 2; i < argc; i++) {
        long *dst = strcmp(argv[i], "--epochs") == 0        ? &epochs
                    : strcmp(argv[i], "--micro-batch") == 0 ? &b
                    : strcmp(argv[i], "--block") == 0       ? &block
                    : strcmp(argv[i], "--prefetch") == 0    ? &prefetch
                                                            : NULL;
        if (strcmp(argv[i], "--no-crc") == 0) {
            no_crc = 1;
        } else if (!dst || i + 1 >= argc || str_to_long(argv[i + 1], dst) != 0 || *dst < 0) {
            DIE_HINT("options: --epochs E --micro-batch b --block B --prefetch P --no-crc",
                     "bad option '%s'", argv[i]);
        } else {
            i++;
        }
    }
    Manifest m;
    CHECK_OK(manifest_load(&m, argv[1]));
    StreamConfig c = {0};
    c.seed = 1;
    c.micro_batch = (size_t)b;
    c.global_batch = (size_t)b * (size_t)size; // one micro-batch per rank and step
    c.block_cells = (size_t)block;
    c.prefetch = (int)prefetch;
    c.skip_file_crc = (int)no_crc;

    CHECK_MPI(MPI_Barrier(MPI_COMM_WORLD));
    double t0 = time_now();
    Stream *s = stream_open(&m, &c, rank, size);
    CHECK(s, "%s", error_last());
    CellBatch mb;
    cellbatch_init(&mb);
    int64_t cells = 0;
    double checksum = 0; // touch every count, as a consumer would
    for (long e = 0; e < epochs; e++) {
        int64_t steps = stream_steps_per_epoch(s);
        for (int64_t st = 0; st < steps; st++) {
            CHECK_OK(stream_next(s, &mb, NULL));
            for (size_t i = 0; i < mb.nnz; i++) checksum += mb.count[i];
            cells += (int64_t)mb.n;
        }
    }
    double dt = time_now() - t0;
    stream_close(s);
    cellbatch_free(&mb);

    double rate = (double)cells / dt, slowest = 0, longest = 0;
    int64_t total = 0;
    CHECK_MPI(MPI_Reduce(&rate, &slowest, 1, MPI_DOUBLE, MPI_MIN, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Reduce(&dt, &longest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Reduce(&cells, &total, 1, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD));
    if (rank == 0)
        printf("perfcell_reader ranks %d cells %lld seconds %.3f cells_per_s_per_rank %.0f "
               "(checksum %.0f)\n",
               size, (long long)total, longest, slowest, checksum);
    manifest_free(&m);
    mpienv_finalize();
    return 0;
}
