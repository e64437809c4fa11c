// MPI start-up and shutdown shared by every program.
#ifndef PERFCELL_MPIENV_H
#define PERFCELL_MPIENV_H

#include <mpi.h>

// MPI_Init_thread (funneled: only the main thread calls MPI), then set the rank
// for error messages and logs and silence HDF5's automatic error printing.
// Collective.
void mpienv_init(int *argc, char ***argv);
// MPI_Finalize. Collective.
void mpienv_finalize(void);
int mpienv_rank(void);
int mpienv_size(void);

#endif
