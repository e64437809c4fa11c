// Classification reports: accuracy, macro-F1, per-class F1 and the confusion
// matrix, as text, TSV and an SVG picture.
#ifndef PERFCELL_REPORT_H
#define PERFCELL_REPORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct {
    size_t K;
    char **names;     // (K) class names (borrowed)
    int64_t *cm;      // (K, K + 1) counts: row = true class, column = predicted
                      // class, the last column Unassigned
    int64_t n;        // cells counted
    int64_t unassigned; // cells predicted "Unassigned" (not in cm)
} Confusion;

void confusion_init(Confusion *c, size_t K, char **names);
void confusion_free(Confusion *c);
void confusion_add(Confusion *c, int truth, int pred);

double confusion_accuracy(const Confusion *c);
// Macro-F1 over the classes present in truth or prediction (as scikit-learn's
// f1_score(average='macro') over the labels that occur).
double confusion_macro_f1(const Confusion *c);
double confusion_f1(const Confusion *c, size_t k);
int64_t confusion_support(const Confusion *c, size_t k);

// Human-readable summary (accuracy, macro-F1, per-class precision, recall,
// F1, support).
void confusion_print(const Confusion *c, FILE *f, const char *title);
// `prefix`.tsv (metrics and the matrix) and `prefix`.svg (heatmap). Returns 0
// or -1 with error_set().
int confusion_write(const Confusion *c, const char *prefix, const char *title);

#endif
