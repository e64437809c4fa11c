// The subcommands of bin/perfcell.
#ifndef PERFCELL_PRETRAIN_H
#define PERFCELL_PRETRAIN_H

int cmd_pretrain(int argc, char **argv);
int cmd_finetune(int argc, char **argv);
int cmd_predict(int argc, char **argv);
int cmd_embed(int argc, char **argv);

#endif
