// `perfcell pretrain`: masked-expression pretraining over MPI ranks.
//
// Each optimizer step: every rank reads its k/N micro-batches from the
// deterministic stream, tokenises and masks them (keyed by cell id and step),
// all-reduces the number of masked positions so that the loss is normalised by
// the global count, runs forward and backward per micro-batch (gradients
// accumulate), all-reduces the gradients, and all ranks apply the same Adam
// update. Rank 0 logs, validates and writes checkpoints.
#include "perfcell/contrastive.h"
#include "perfcell/error.h"
#include "perfcell/log.h"
#include "perfcell/mlm.h"
#include "perfcell/pretrain.h"
#include "perfcell/tokens.h"
#include "perfcell/train.h"
#include "perfcell/util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: mpirun -np N perfcell pretrain --config FILE [--resume auto|CHECKPOINT] [section.key=value ...]\n"
    "\n"
    "Masked-expression pretraining of scBERT's Performer on a shard folder\n"
    "(optionally with CellLM's contrastive loss: contrastive.weight > 0).\n"
    "Checkpoints go to RUN_DIR/checkpoints; SIGTERM or SIGUSR1 make the run\n"
    "checkpoint at the next step boundary and exit 0; --resume auto continues\n"
    "from the newest complete checkpoint (on any number of ranks that divides\n"
    "the global batch's micro-batches).\n"
    "One run per folder: a second command on the same RUN_DIR is refused (the\n"
    "lock file RUN_DIR/perfcell.lock names the running one's host and pid), and a\n"
    "start refused for any reason leaves RUN_DIR as it was.\n"
    "--print-config prints the resolved configuration and exits (no run).\n";

// Masks of validation passes use a fixed key so successive passes compare.
#define VAL_STEP 0x7fffffff

typedef struct {
    Model *m;
    const ModelConfig *mc;
    TokenBatch *tb;
    float *logits;
    uint64_t seed;
    double mask_prob, replace_prob;
    MlmStats st;
} ValCtx;

static int val_batch(const CellBatch *cb, void *p) {
    ValCtx *v = p;
    tokens_from_cells(v->tb, cb, v->mc, v->seed, VAL_STEP);
    mlm_mask(v->tb, v->mc, v->mask_prob, v->replace_prob, v->seed, VAL_STEP);
    PassCtx ctx = {v->seed, VAL_STEP, 0, 0};
    model_forward(v->m, v->tb, &ctx);
    const ParamEntry *w = param_table_find(&v->m->table, "to_out.weight");
    const ParamEntry *b = param_table_find(&v->m->table, "to_out.bias");
    size_t V = (size_t)v->mc->bins + 2;
    mlm_logits(v->logits, v->m->hidden, v->m->params + w->offset, v->m->params + b->offset,
               v->tb->n_tokens, v->mc->dim, V);
    mlm_loss(NULL, v->logits, v->tb->target, v->tb->n_tokens, V, 1.0, &v->st);
    return 0;
}

// The contrastive step's cells, straight from the stream: pass 1 takes the
// step's micro-batches with stream_next(), pass 2 reads the same ones again
// with stream_replay(), so the step never holds more than a micro-batch of
// cells whatever the global batch.
typedef struct {
    Trainer *t;
    const ModelConfig *mc;
    CellBatch cb;
    TokenBatch tb;
    double mask_prob, replace_prob;
    int64_t tokens; // pass 1
} StreamCells;

static const TokenBatch *stream_cells_get(void *p, size_t i, int pass) {
    StreamCells *s = p;
    int rc = pass == 1 ? stream_next(s->t->stream, &s->cb, NULL) : stream_replay(s->t->stream, i, &s->cb);
    if (rc != 0) return NULL;
    tokens_from_cells(&s->tb, &s->cb, s->mc, s->t->seed, s->t->step);
    mlm_mask(&s->tb, s->mc, s->mask_prob, s->replace_prob, s->t->seed, s->t->step);
    if (pass == 1) s->tokens += (int64_t)s->tb.n_tokens;
    return &s->tb;
}

static void read_failed(const Trainer *t, int failed_here) {
    if (failed_here) fprintf(stderr, "[rank %d] error: %s\n", t->rank, error_last());
    DIE_HINT("run `perfcell-inspect --verify` on the shard folder; resume with --resume auto "
             "after fixing it",
             "reading the training cells failed at step %lld", (long long)t->step);
}

// Validation masked loss and accuracy over (at most run.val_cells) held-out
// cells. Collective.
static void validate(Trainer *t, const ModelConfig *mc, TokenBatch *tb, float *logits,
                     double *loss, double *acc, int64_t *n) {
    ValCtx v = {.m = &t->model,
                .mc = mc,
                .tb = tb,
                .logits = logits,
                .seed = t->seed,
                .mask_prob = config_float(t->cfg, "mlm.mask_prob"),
                .replace_prob = config_float(t->cfg, "mlm.replace_prob")};
    size_t want = (size_t)config_int(t->cfg, "run.val_cells");
    size_t per_rank = want ? (want + (size_t)t->size - 1) / (size_t)t->size : 0;
    int ok = stream_for_each_validation(t->stream, (size_t)config_int(t->cfg, "batch.micro_batch"),
                                        per_rank, val_batch, &v) == 0;
    int all_ok = 0;
    CHECK_MPI(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (!all_ok) {
        if (!ok) log_warn("validation read failed: %s", error_last());
        DIE("validation failed (see the warning above)");
    }
    double in[3] = {v.st.loss_sum, (double)v.st.n, (double)v.st.correct}, out[3];
    CHECK_MPI(MPI_Allreduce(in, out, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    *n = (int64_t)out[1];
    *loss = out[1] > 0 ? out[0] / out[1] : NAN;
    *acc = out[1] > 0 ? out[2] / out[1] : NAN;
}

int cmd_pretrain(int argc, char **argv) {
    TrainArgs args;
    int rc = train_args_parse(argc, argv, &args, USAGE);
    if (rc == 1) return 0;
    if (rc != 0) DIE_HINT("see `perfcell pretrain --help`", "%s", error_last());

    Trainer t;
    trainer_config(&t, &args, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, "pretrain");
    trainer_open_data(&t);
    const Config *cfg = t.cfg;

    ModelConfig mc;
    if (train_model_config(cfg, (size_t)t.manifest.n_genes, &mc) != 0)
        DIE_HINT("check the [model] section", "%s", error_last());
    ContrastiveConfig cc;
    contrastive_config(cfg, &cc);
    if (cc.weight > 0 && mc.dropout_emb == 0 && mc.dropout_attn == 0 && mc.dropout_ff == 0) {
        // Two views of a cell differ only by dropout (SimCSE).
        mc.dropout_emb = mc.dropout_attn = mc.dropout_ff = (float)cc.dropout;
    }

    // Batch geometry: k = G / b logical streams, N ranks serve k / N each.
    const size_t b = (size_t)config_int(cfg, "batch.micro_batch");
    size_t G = (size_t)config_int(cfg, "batch.global_batch");
    if (G == 0) G = b * (size_t)config_int(cfg, "batch.accumulation") * (size_t)t.size;
    if (G % b != 0 || (G / b) % (size_t)t.size != 0)
        DIE_HINT("choose batch.global_batch = micro_batch x accumulation x ranks",
                 "batch.global_batch %zu is not a multiple of batch.micro_batch %zu x %d ranks", G,
                 b, t.size);
    StreamConfig sc = {.seed = t.seed,
                       .global_batch = G,
                       .micro_batch = b,
                       .block_cells = (size_t)config_int(cfg, "data.block_cells"),
                       .val_fraction = config_float(cfg, "data.val_fraction"),
                       .split_seed = (uint64_t)config_int(cfg, "data.split_seed"),
                       .prefetch = (int)config_int(cfg, "data.prefetch")};
    t.stream = stream_open(&t.manifest, &sc, t.rank, t.size);
    if (!t.stream) DIE_HINT("check the [data] and [batch] sections", "%s", error_last());
    const size_t local_mb = stream_local_micro_batches(t.stream);

    int64_t max_nnz = trainer_max_cell_nnz(&t);
    const size_t per_cell = tokens_cell_length(&mc, (size_t)max_nnz);
    const size_t sub = cc.weight > 0 && cc.sub_batch ? cc.sub_batch : b;
    const size_t max_tokens = (sub > b ? sub : b) * per_cell;

    ParamTable table;
    param_table_init(&table);
    model_table_add_encoder(&table, &mc);
    mlm_head_add(&table, &mc);
    if (cc.weight > 0) contrastive_head_add(&table, &mc, &cc);
    trainer_build_model(&t, &mc, &table, max_tokens, sub > b ? sub : b, per_cell);
    trainer_load_gene2vec(&t);
    int resumed = trainer_resume(&t, args.resume, NULL);
    trainer_begin(&t, resumed);
    trainer_install_signals();

    const int64_t max_steps = config_int(cfg, "run.max_steps");
    log_info("pretrain: %lld training cells, %lld genes, mode %s, %d rank%s x %zu micro-batch%s of %zu "
             "cells, global batch %zu, %lld steps/epoch, %lld cells/epoch (%lld left out, a window that "
             "moves every epoch), steps %lld -> %lld",
             (long long)stream_train_cells(t.stream), (long long)t.manifest.n_genes,
             mc.mode == SEQ_FULL ? "full" : "nonzero", t.size, t.size > 1 ? "s" : "", local_mb,
             local_mb > 1 ? "es" : "", b, G, (long long)stream_steps_per_epoch(t.stream),
             (long long)stream_epoch_cells(t.stream),
             (long long)(stream_train_cells(t.stream) - stream_epoch_cells(t.stream)), (long long)t.step,
             (long long)max_steps);

    const size_t V = (size_t)mc.bins + 2, C = mc.dim;
    // One cell buffer (cells are kept only as tokens once tokenised) and the
    // tokens of every local micro-batch of the step.
    CellBatch cb;
    cellbatch_init(&cb);
    TokenBatch *tbs = xcalloc(local_mb, sizeof *tbs);
    for (size_t i = 0; i < local_mb; i++) tokenbatch_init(&tbs[i]);
    StreamCells scells = {.t = &t, .mc = &mc};
    cellbatch_init(&scells.cb);
    tokenbatch_init(&scells.tb);
    size_t *mb_cells = xmalloc(local_mb * sizeof *mb_cells);
    for (size_t i = 0; i < local_mb; i++) mb_cells[i] = b;
    const StepCells step_cells = {stream_cells_get, &scells, local_mb, mb_cells};
    TokenBatch vtb;
    tokenbatch_init(&vtb);
    float *logits = floats_alloc(max_tokens * V), *dlogits = floats_alloc(max_tokens * V);
    float *dhidden = floats_alloc(max_tokens * C);
    Contrastive con;
    if (cc.weight > 0) contrastive_init(&con, &t.model, &cc, local_mb * b, G, MPI_COMM_WORLD);

    const ParamEntry *ew = param_table_find(&t.model.table, "to_out.weight");
    const ParamEntry *eb = param_table_find(&t.model.table, "to_out.bias");
    const double mask_prob = config_float(cfg, "mlm.mask_prob");
    const double replace_prob = config_float(cfg, "mlm.replace_prob");
    scells.mask_prob = mask_prob;
    scells.replace_prob = replace_prob;
    const double mlm_weight = config_float(cfg, "mlm.weight");
    const int64_t log_every = config_int(cfg, "run.log_every");
    const int64_t val_every = config_int(cfg, "run.val_every");
    const int64_t ckpt_every = config_int(cfg, "checkpoint.every_steps");

    double vloss, vacc;
    int64_t vn;
    if (!resumed && val_every >= 0) {
        validate(&t, &mc, &vtb, logits, &vloss, &vacc, &vn);
        log_info("validation at step 0: masked loss %.4f, accuracy %.4f (%lld masked positions)",
                 vloss, vacc, (long long)vn);
        char js[160];
        snprintf(js, sizeof js, "\"val_loss\":%.6f,\"val_acc\":%.6f,\"val_masked\":%lld", vloss,
                 vacc, (long long)vn);
        trainer_metrics_write(&t, js);
    }

    int64_t *cursor = xcalloc(stream_cursor_len(t.stream), sizeof *cursor);
    const double start = time_now();
    double last_ckpt = start, window_t = 0;
    int64_t window_steps = 0, window_skipped = 0, last_ckpt_step = t.step;
    double win[4] = {0}; // loss_sum, n, correct, tokens over the log window
    while (t.step < max_steps) {
        double t0 = time_now();
        trainer_maybe_redraw(&t);
        model_zero_grad(&t.model);
        MlmStats st = {0};
        double closs = 0;
        int loss_bad = 0;
        int64_t local_tokens = 0;
        if (cc.weight > 0) {
            // The step reads its cells itself, once per pass.
            scells.tokens = 0;
            int64_t mismatch = con.z_mismatch;
            int crc = contrastive_step_cells(&con, &t.model, &step_cells, t.seed, t.step, mlm_weight, 0,
                                            &st, &closs);
            if (crc != 0) read_failed(&t, crc == -1);
            if (con.z_mismatch != mismatch)
                log_warn("step %lld: pass 2 re-encoded %lld sub-batches to another z than pass 1; the "
                         "contrastive gradient of this step is approximate",
                         (long long)t.step, (long long)(con.z_mismatch - mismatch));
            local_tokens = scells.tokens;
            loss_bad |= !isfinite(closs);
        } else {
            // Read, tokenise and mask this rank's micro-batches.
            int ok = 1;
            int64_t local_masked = 0;
            for (size_t i = 0; i < local_mb && ok; i++) {
                ok = stream_next(t.stream, &cb, NULL) == 0;
                if (!ok) break;
                tokens_from_cells(&tbs[i], &cb, &mc, t.seed, t.step);
                local_masked += (int64_t)mlm_mask(&tbs[i], &mc, mask_prob, replace_prob, t.seed, t.step);
                local_tokens += (int64_t)tbs[i].n_tokens;
            }
            int all_ok = 0;
            CHECK_MPI(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
            if (!all_ok) read_failed(&t, !ok);
            int64_t global_masked = 0;
            CHECK_MPI(MPI_Allreduce(&local_masked, &global_masked, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
            const double n_norm = global_masked > 0 ? (double)global_masked : 1.0;
            const float *w = t.model.params + ew->offset, *bb = t.model.params + eb->offset;
            float *dw = t.model.grads + ew->offset, *db = t.model.grads + eb->offset;
            PassCtx ctx = {t.seed, t.step, 0, 1};
            for (size_t i = 0; i < local_mb; i++) {
                const TokenBatch *tb = &tbs[i];
                model_forward(&t.model, tb, &ctx);
                mlm_logits(logits, t.model.hidden, w, bb, tb->n_tokens, C, V);
                double l = mlm_loss(dlogits, logits, tb->target, tb->n_tokens, V, n_norm, &st);
                loss_bad |= !isfinite(l);
                if (mlm_weight != 1.0)
                    for (size_t j = 0; j < tb->n_tokens * V; j++) dlogits[j] *= (float)mlm_weight;
                mlm_backward(dhidden, dw, db, dlogits, t.model.hidden, w, tb->n_tokens, C, V);
                model_backward(&t.model, tb, &ctx, dhidden);
            }
        }
        int local_bad = loss_bad ? -2 : trainer_local_nonfinite(&t);
        if (config_bool(cfg, "dist.overlap")) {
            gradsync_start(&t.sync, t.model.grads);
            gradsync_wait(&t.sync);
        } else {
            gradsync_allreduce(&t.sync, t.model.grads);
        }
        double lr = 0;
        double gnorm = trainer_optimizer_step(&t, local_bad, &lr);

        double in[5] = {st.loss_sum, (double)st.n, (double)st.correct, (double)local_tokens, closs};
        double out[5];
        CHECK_MPI(MPI_Allreduce(in, out, 5, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
        double dt = time_now() - t0;
        t.train_seconds += dt;
        t.cells_seen += (int64_t)G;
        t.tokens_seen += (int64_t)out[3];
        for (int j = 0; j < 4; j++) win[j] += out[j];
        window_t += dt;
        window_steps++;
        window_skipped += gnorm < 0;

        if (t.step % log_every == 0 || t.step == max_steps) {
            // The epoch the stream is in (the cursor's first value).
            stream_cursor_get(t.stream, cursor);
            double loss = win[1] > 0 ? win[0] / win[1] : NAN, acc = win[1] > 0 ? win[2] / win[1] : NAN;
            double cps = (double)G * (double)window_steps / window_t, tps = win[3] / window_t;
            char eta[32];
            fmt_duration((double)(max_steps - t.step) * window_t / (double)window_steps, eta);
            char cl[64] = "";
            if (cc.weight > 0) snprintf(cl, sizeof cl, " | contrastive %.4f", out[4] / t.size);
            char gn[48];
            if (gnorm < 0) snprintf(gn, sizeof gn, "skipped (NaN/Inf)");
            else snprintf(gn, sizeof gn, "%.3g", gnorm);
            log_info("step %lld/%lld | epoch %lld | loss %.4f | acc %.4f%s | lr %.2e | gnorm %s | "
                     "%.1f cells/s | %.3g tokens/s | ETA %s",
                     (long long)t.step, (long long)max_steps, (long long)cursor[0],
                     loss, acc, cl, lr, gn, cps, tps, eta);
            // A skipped step (run.nan_policy = skip) has no gradient norm: null.
            if (gnorm < 0) snprintf(gn, sizeof gn, "null");
            char js[512];
            snprintf(js, sizeof js,
                     "\"loss\":%.6f,\"acc\":%.6f,\"lr\":%.6e,\"grad_norm\":%s,\"cells_per_s\":%.3f,"
                     "\"tokens_per_s\":%.1f,\"step_s\":%.4f,\"allreduce_s\":%.4f,\"cells_seen\":%lld,"
                     "\"skipped_steps\":%lld",
                     loss, acc, lr, gn, cps, tps, window_t / (double)window_steps,
                     t.sync.seconds, (long long)t.cells_seen, (long long)window_skipped);
            if (cc.weight > 0) {
                size_t l = strlen(js);
                snprintf(js + l, sizeof js - l, ",\"contrastive_loss\":%.6f,\"contrastive_coord_s\":%.4f",
                         out[4] / t.size, con.coord_seconds);
            }
            trainer_metrics_write(&t, js);
            memset(win, 0, sizeof win);
            window_t = 0;
            window_steps = 0;
            window_skipped = 0;
        }
        if (val_every > 0 && t.step % val_every == 0 && t.step < max_steps) {
            validate(&t, &mc, &vtb, logits, &vloss, &vacc, &vn);
            log_info("validation at step %lld: masked loss %.4f, accuracy %.4f", (long long)t.step,
                     vloss, vacc);
            char js[160];
            snprintf(js, sizeof js, "\"val_loss\":%.6f,\"val_acc\":%.6f,\"val_masked\":%lld", vloss,
                     vacc, (long long)vn);
            trainer_metrics_write(&t, js);
            if (cc.weight > 0) contrastive_validate(&con, &t, &mc, &vtb);
        }
        StepFlags f = trainer_step_flags(&t, &last_ckpt, start);
        if ((ckpt_every > 0 && t.step % ckpt_every == 0) || f.checkpoint || f.stop ||
            t.step == max_steps) {
            trainer_checkpoint(&t, NULL, 0);
            last_ckpt_step = t.step;
        }
        if (f.stop) break;
    }
    if (t.step == max_steps) {
        validate(&t, &mc, &vtb, logits, &vloss, &vacc, &vn);
        log_info("final validation at step %lld: masked loss %.4f, accuracy %.4f", (long long)t.step,
                 vloss, vacc);
        char js[160];
        snprintf(js, sizeof js, "\"val_loss\":%.6f,\"val_acc\":%.6f,\"val_masked\":%lld", vloss, vacc,
                 (long long)vn);
        trainer_metrics_write(&t, js);
        if (cc.weight > 0) contrastive_validate(&con, &t, &mc, &vtb);
        if (last_ckpt_step != t.step) trainer_checkpoint(&t, NULL, 0);
    }
    char dur[32], rss[32];
    double my_rss = (double)mem_peak_rss(), max_rss = 0;
    CHECK_MPI(MPI_Reduce(&my_rss, &max_rss, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD));
    log_info("done: step %lld, %lld cells seen, %s of training, peak RSS per rank %s (largest)",
             (long long)t.step, (long long)t.cells_seen, fmt_duration(t.train_seconds, dur),
             fmt_bytes(max_rss, rss));
    char js[64];
    snprintf(js, sizeof js, "\"peak_rss_bytes\":%.0f", max_rss);
    trainer_metrics_write(&t, js);

    if (cc.weight > 0) contrastive_free(&con);
    free(cursor);
    cellbatch_free(&cb);
    cellbatch_free(&scells.cb);
    tokenbatch_free(&scells.tb);
    free(mb_cells);
    for (size_t i = 0; i < local_mb; i++) tokenbatch_free(&tbs[i]);
    free(tbs);
    tokenbatch_free(&vtb);
    free(logits);
    free(dlogits);
    free(dhidden);
    trainer_free(&t);
    free(args.overrides);
    return 0;
}
