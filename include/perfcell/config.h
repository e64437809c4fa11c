// Configuration files (INI, parsed by Debian's iniparser) checked against a
// schema: every key has a type, a default and a one-line description. Unknown
// keys are errors that suggest the nearest valid key; values are checked for
// type, range and allowed choices. `section.key=value` overrides from the
// command line are applied on top of the file.
#ifndef PERFCELL_CONFIG_H
#define PERFCELL_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { CFG_INT, CFG_FLOAT, CFG_BOOL, CFG_STRING, CFG_CHOICE } ConfigType;

typedef struct {
    const char *name;    // "section.key"
    ConfigType type;
    const char *def;     // default value, as text
    double lo, hi;       // inclusive range for CFG_INT / CFG_FLOAT (lo > hi: unchecked)
    const char *choices; // "a|b|c" for CFG_CHOICE
    const char *help;
} ConfigKey;

typedef struct Config Config;

// Load `path` (NULL: defaults only) and apply overrides ("section.key=value").
// Returns NULL with error_set() on any problem (unreadable file, syntax error,
// unknown key, bad value); the message names the file, the line and the key.
Config *config_load(const char *path, const ConfigKey *schema, size_t n_schema,
                    const char *const *overrides, size_t n_overrides);
void config_free(Config *c);

// Typed getters. `name` must be in the schema (a programming error otherwise).
long config_int(const Config *c, const char *name);
double config_float(const Config *c, const char *name);
int config_bool(const Config *c, const char *name);
const char *config_str(const Config *c, const char *name);
// Whether the value came from the file or an override (not the default).
int config_is_set(const Config *c, const char *name);

// The resolved configuration as INI text (every schema key, in schema order).
// Identical configurations give identical text; the caller frees it.
char *config_to_ini(const Config *c);
uint64_t config_hash(const Config *c);
const char *config_path(const Config *c);

// Print the schema (for --help): section, key, type, default, description.
void config_print_schema(FILE *f, const ConfigKey *schema, size_t n_schema);

#endif
