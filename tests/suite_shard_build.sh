# Shard building (perfcell-shard vocab / build).
# tests/test_inputs.c: vocabulary rules, readers of every format (the same
# pbmc3k cells from .h5ad, 10x HDF5 and MatrixMarket agree), damaged files.
# tests/py/shard_check.py: shards built from every data set and compared cell
# by cell with the input read in Python (anndata, h5py, scipy.io.mmread), read
# back with h5py, anndata.read_h5ad and h5dump, manifest checksums recomputed.
SHARD_CHECK="$PYTHON tests/py/shard_check.py"

run shard_build.unit_inputs 180 "$TBIN/test_inputs"

# Every input format (vocabulary from the same input; several shards, 2-3 ranks).
run shard_build.h5ad_pbmc3k_obs_labels 150 $SHARD_CHECK roundtrip "$DATA/pbmc3k/pbmc3k_counts.h5ad" --label-key celltype --np 2
run shard_build.h5ad_pbmc3k_tsv_labels 150 $SHARD_CHECK roundtrip "$DATA/pbmc3k/pbmc3k_counts.h5ad" --labels "$DATA/pbmc3k/labels.tsv" --np 3 --shard-cells 700
run shard_build.h5ad_mouse_bladder 150 $SHARD_CHECK roundtrip "$DATA/other/mouse_bladder_top2000.h5ad" --label-key celltype --np 2
run shard_build.10x_h5_v3_pbmc3k 150 $SHARD_CHECK roundtrip "$DATA/pbmc3k/filtered_feature_bc_matrix.h5" --labels "$DATA/pbmc3k/labels.tsv" --np 2
run shard_build.10x_h5_v3_chr21 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/3.0.0/filtered_feature_bc_matrix.h5" --np 3 --shard-cells 300
run shard_build.10x_h5_v2 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/1.2.0/filtered_gene_bc_matrices_h5.h5" --np 2 --shard-cells 5
run shard_build.10x_h5_v2_genome_hg19 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/1.2.0/multiple_genomes.h5" --genome hg19_chr21 --np 1
run shard_build.10x_h5_v2_genome_other 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/1.2.0/multiple_genomes.h5" --genome another_genome --np 2
run shard_build.10x_h5_v2_genome_all 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/1.2.0/multiple_genomes.h5" --genome all --np 3 --shard-cells 5
run shard_build.mtx_v3_pbmc3k 150 $SHARD_CHECK roundtrip "$DATA/pbmc3k/filtered_feature_bc_matrix" --labels "$DATA/pbmc3k/labels.tsv" --np 2
run shard_build.mtx_v3_chr21 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/3.0.0/filtered_feature_bc_matrix" --np 2 --shard-cells 300
run shard_build.mtx_v2 120 $SHARD_CHECK roundtrip "$DATA/10x_formats/1.2.0/filtered_gene_bc_matrices/hg19_chr21" --np 2

# CSC, dense and integer layers/counts .h5ad files (and raw/X) made in the test.
run shard_build.h5ad_csc_dense_layers 180 $SHARD_CHECK variants

# The same shards from 1, 2 and 3 ranks (and small write pieces).
run shard_build.rank_invariance 180 $SHARD_CHECK invariance "$DATA/pbmc3k/pbmc3k_counts.h5ad" --label-key celltype --shard-cells 1000

# A vocabulary unlike the input: missing genes, dropped genes, a duplicate.
run shard_build.vocab_mismatch 120 $SHARD_CHECK mismatch

# Non-counts, missing files, unknown formats, bad labels, bad vocabularies,
# malformed MatrixMarket, existing outputs: refused, nothing left behind.
run shard_build.refusals 240 $SHARD_CHECK refusals

# Two inputs of two formats: union vocabulary, --min-cells, dataset names,
# labels from a TSV that covers one input only.
run shard_build.multi_input 180 $SHARD_CHECK multi
