// Classification reports.
#include "perfcell/report.h"

#include "perfcell/error.h"
#include "perfcell/util.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void confusion_init(Confusion *c, size_t K, char **names) {
    memset(c, 0, sizeof *c);
    c->K = K;
    c->names = names;
    c->cm = xcalloc(K * (K + 1) + 1, sizeof *c->cm);
}

void confusion_free(Confusion *c) {
    free(c->cm);
    memset(c, 0, sizeof *c);
}

void confusion_add(Confusion *c, int truth, int pred) {
    if (truth < 0 || (size_t)truth >= c->K) return;
    c->n++;
    if (pred < 0 || (size_t)pred >= c->K) {
        c->unassigned++;
        pred = (int)c->K; // the Unassigned column
    }
    c->cm[(size_t)truth * (c->K + 1) + (size_t)pred]++;
}

double confusion_accuracy(const Confusion *c) {
    int64_t hit = 0;
    for (size_t k = 0; k < c->K; k++) hit += c->cm[k * (c->K + 1) + k];
    return c->n ? (double)hit / (double)c->n : 0.0;
}

int64_t confusion_support(const Confusion *c, size_t k) {
    int64_t s = 0;
    for (size_t j = 0; j <= c->K; j++) s += c->cm[k * (c->K + 1) + j];
    return s;
}

static int64_t predicted(const Confusion *c, size_t k) {
    int64_t s = 0;
    for (size_t i = 0; i < c->K; i++) s += c->cm[i * (c->K + 1) + k];
    return s;
}

double confusion_f1(const Confusion *c, size_t k) {
    // Unassigned cells of class k are misses: they lower recall, not precision.
    int64_t tp = c->cm[k * (c->K + 1) + k], pred = predicted(c, k), sup = confusion_support(c, k);
    double denom = (double)(sup + pred);
    return denom > 0 ? 2.0 * (double)tp / denom : 0.0;
}

double confusion_macro_f1(const Confusion *c) {
    double s = 0.0;
    size_t m = 0;
    for (size_t k = 0; k < c->K; k++) {
        if (confusion_support(c, k) == 0 && predicted(c, k) == 0) continue;
        s += confusion_f1(c, k);
        m++;
    }
    return m ? s / (double)m : 0.0;
}

void confusion_print(const Confusion *c, FILE *f, const char *title) {
    fprintf(f, "%s: %lld cells, accuracy %.4f, macro-F1 %.4f", title, (long long)c->n,
            confusion_accuracy(c), confusion_macro_f1(c));
    if (c->unassigned) fprintf(f, ", %lld Unassigned", (long long)c->unassigned);
    fputc('\n', f);
    fprintf(f, "  %-24s %9s %9s %9s %8s\n", "class", "precision", "recall", "F1", "support");
    for (size_t k = 0; k < c->K; k++) {
        int64_t tp = c->cm[k * (c->K + 1) + k], sup = confusion_support(c, k), pred = predicted(c, k);
        if (sup == 0 && pred == 0) continue;
        fprintf(f, "  %-24.24s %9.4f %9.4f %9.4f %8lld\n", c->names[k],
                pred ? (double)tp / (double)pred : 0.0, sup ? (double)tp / (double)sup : 0.0,
                confusion_f1(c, k), (long long)sup);
    }
}

static void xml_escape(FILE *f, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

// Each file is composed in memory and written atomically (temporary file,
// rename): a failed write leaves an older report as it was.
static FILE *report_open(char **buf, size_t *len) {
    FILE *f = open_memstream(buf, len);
    if (!f) error_set("cannot compose a report: %s", strerror(errno));
    return f;
}

static int report_commit(FILE *f, char **buf, size_t *len, const char *path) {
    int bad = ferror(f);
    int rc = fclose(f) != 0 || bad ? error_set("cannot compose '%s'", path) : 0;
    if (rc == 0) rc = file_write_atomic(path, *buf, *len);
    free(*buf);
    *buf = NULL;
    return rc;
}

int confusion_write(const Confusion *c, const char *prefix, const char *title) {
    size_t n = strlen(prefix) + 8;
    char *path = xmalloc(n);
    snprintf(path, n, "%s.tsv", prefix);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = report_open(&buf, &len);
    if (!f) {
        free(path);
        return -1;
    }
    fprintf(f, "# %s\n", title);
    fprintf(f, "metric\tvalue\n");
    fprintf(f, "cells\t%lld\naccuracy\t%.6f\nmacro_f1\t%.6f\nunassigned\t%lld\n", (long long)c->n,
            confusion_accuracy(c), confusion_macro_f1(c), (long long)c->unassigned);
    fprintf(f, "\nclass\tprecision\trecall\tf1\tsupport\n");
    for (size_t k = 0; k < c->K; k++) {
        int64_t tp = c->cm[k * (c->K + 1) + k], sup = confusion_support(c, k), pred = predicted(c, k);
        fprintf(f, "%s\t%.6f\t%.6f\t%.6f\t%lld\n", c->names[k], pred ? (double)tp / (double)pred : 0.0,
                sup ? (double)tp / (double)sup : 0.0, confusion_f1(c, k), (long long)sup);
    }
    fprintf(f, "\ntrue\\predicted");
    for (size_t k = 0; k < c->K; k++) fprintf(f, "\t%s", c->names[k]);
    fputs("\tUnassigned\n", f);
    for (size_t i = 0; i < c->K; i++) {
        fprintf(f, "%s", c->names[i]);
        for (size_t j = 0; j <= c->K; j++) fprintf(f, "\t%lld", (long long)c->cm[i * (c->K + 1) + j]);
        fputc('\n', f);
    }
    if (report_commit(f, &buf, &len, path) != 0) {
        free(path);
        return -1;
    }

    // The heatmap: rows normalised by support, the count in each cell.
    snprintf(path, n, "%s.svg", prefix);
    f = report_open(&buf, &len);
    if (!f) {
        free(path);
        return -1;
    }
    const int cell = 44, left = 170, top = 150;
    const int W = left + cell * (int)c->K + 20, H = top + cell * (int)c->K + 40;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "font-family=\"sans-serif\" font-size=\"11\">\n", W, H);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" "
               "font-size=\"14\">");
    xml_escape(f, title);
    fprintf(f, " (accuracy %.3f, macro-F1 %.3f)</text>\n", confusion_accuracy(c), confusion_macro_f1(c));
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">predicted</text>\n",
            left + cell * (int)c->K / 2, 40);
    fprintf(f, "<text x=\"12\" y=\"%d\" transform=\"rotate(-90 12 %d)\" text-anchor=\"middle\">true</text>\n",
            top + cell * (int)c->K / 2, top + cell * (int)c->K / 2);
    for (size_t j = 0; j < c->K; j++) {
        int x = left + cell * (int)j + cell / 2;
        fprintf(f, "<text x=\"%d\" y=\"%d\" transform=\"rotate(-60 %d %d)\">", x, top - 6, x, top - 6);
        xml_escape(f, c->names[j]);
        fputs("</text>\n", f);
    }
    for (size_t i = 0; i < c->K; i++) {
        int y = top + cell * (int)i;
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">", left - 6, y + cell / 2 + 4);
        xml_escape(f, c->names[i]);
        fputs("</text>\n", f);
        int64_t sup = confusion_support(c, i);
        for (size_t j = 0; j < c->K; j++) {
            int64_t v = c->cm[i * (c->K + 1) + j];
            double frac = sup ? (double)v / (double)sup : 0.0;
            int shade = (int)lround(255.0 * (1.0 - frac));
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"rgb(%d,%d,255)\" "
                       "stroke=\"#ccc\"/>\n", left + cell * (int)j, y, cell, cell, shade, shade);
            if (v)
                fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"%s\">%lld</text>\n",
                        left + cell * (int)j + cell / 2, y + cell / 2 + 4, frac > 0.5 ? "white" : "black",
                        (long long)v);
        }
    }
    fputs("</svg>\n", f);
    int rc = report_commit(f, &buf, &len, path);
    free(path);
    return rc;
}
