// MPI start-up and shutdown.
#include "perfcell/mpienv.h"

#include "perfcell/error.h"
#include "perfcell/log.h"

static int g_rank = 0, g_size = 1;

void mpienv_init(int *argc, char ***argv) {
    int provided = 0;
    CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    CHECK(provided >= MPI_THREAD_FUNNELED, "MPI library gives no MPI_THREAD_FUNNELED support");
    CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &g_rank));
    CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &g_size));
    // Errors on the world communicator come back as codes: CHECK_MPI reports them.
    CHECK_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    error_set_rank(g_rank);
    log_init(g_rank, g_size);
    error_h5_quiet();
}

void mpienv_finalize(void) { MPI_Finalize(); }

int mpienv_rank(void) { return g_rank; }
int mpienv_size(void) { return g_size; }
