// Schema-checked INI configuration on top of iniparser.
#include "perfcell/config.h"

#include "perfcell/error.h"
#include "perfcell/util.h"

#include <dictionary.h>
#include <iniparser.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct Config {
    const ConfigKey *schema;
    size_t n;
    char **value; // (n) resolved text of each key
    int *set;     // (n) 1 if given in the file or an override
    char *path;
};

// ---------------------------------------------------------------------------
// iniparser reports syntax errors through a printf-like callback: keep the text.

static char g_ini_error[512];

static int ini_error_cb(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t used = strlen(g_ini_error);
    int n = vsnprintf(g_ini_error + used, sizeof g_ini_error - used, fmt, ap);
    va_end(ap);
    return n;
}

static long schema_find(const ConfigKey *schema, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(schema[i].name, name) == 0) return (long)i;
    return -1;
}

// The schema key nearest to `name`: by edit distance, and a key of the same
// name in another section counts as near.
static const char *schema_nearest(const ConfigKey *schema, size_t n, const char *name) {
    const char *best = NULL;
    size_t best_d = (size_t)-1;
    const char *dot = strchr(name, '.');
    const char *bare = dot ? dot + 1 : name;
    for (size_t i = 0; i < n; i++) {
        size_t d = str_edit_distance(name, schema[i].name);
        const char *sd = strchr(schema[i].name, '.');
        if (sd && strcmp(sd + 1, bare) == 0) d = 1;
        if (d < best_d) {
            best_d = d;
            best = schema[i].name;
        }
    }
    size_t len = strlen(name);
    return best_d <= (len < 6 ? 2 : len / 2) ? best : NULL;
}

// Line number of `key` inside `[section]` of the file at `path` (0: not found).
static int find_line(const char *path, const char *section, const char *key) {
    if (!path) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[1024];
    int no = 0, in = (section[0] == '\0'), found = 0;
    while (fgets(line, sizeof line, f)) {
        no++;
        char *s = str_trim(line);
        if (*s == '[') {
            char *e = strchr(s, ']');
            if (e) *e = '\0';
            in = strcasecmp(str_trim(s + 1), section) == 0;
            continue;
        }
        if (!in) continue;
        char *eq = strpbrk(s, "=:");
        if (!eq) continue;
        *eq = '\0';
        if (strcasecmp(str_trim(s), key) == 0) {
            found = no;
            break;
        }
    }
    fclose(f);
    return found;
}

// A key given twice in the file (in one [section], or in two sections of the
// same name): iniparser keeps the last silently, so we read the lines
// ourselves. Keys and sections compare without case, as iniparser's do;
// continued lines (a trailing backslash) are skipped. Returns 0, or -1 with
// error_set() naming both lines.
static int find_duplicate_key(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    typedef struct {
        char *name; // "section:key", lower case
        int line;
    } Seen;
    Seen *seen = NULL;
    size_t n = 0, cap = 0;
    char line[1100], section[256] = "";
    int no = 0, rc = 0, continued = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        no++;
        char *s = str_trim(line);
        int was_continued = continued;
        size_t len = strlen(s);
        continued = len > 0 && s[len - 1] == '\\';
        if (was_continued || *s == '\0' || *s == ';' || *s == '#') continue;
        if (*s == '[') {
            char *e = strchr(s, ']');
            if (e) *e = '\0';
            snprintf(section, sizeof section, "%s", str_trim(s + 1));
            continue;
        }
        char *eq = strchr(s, '='); // iniparser's only separator
        if (!eq) continue;
        *eq = '\0';
        char name[600];
        snprintf(name, sizeof name, "%s:%s", section, str_trim(s));
        for (char *p = name; *p; p++)
            if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (strcmp(seen[i].name, name) != 0) continue;
            char *colon = strchr(name, ':');
            *colon = '.';
            rc = error_set("%s: key '%s' is given twice, at %s:%d and at %s:%d", path, name, path,
                           seen[i].line, path, no);
            error_set_hint("keep one of the two lines");
        }
        if (n == cap) seen = xrealloc(seen, (cap = cap ? 2 * cap : 64) * sizeof *seen);
        seen[n].name = xstrdup(name);
        seen[n++].line = no;
    }
    fclose(f);
    for (size_t i = 0; i < n; i++) free(seen[i].name);
    free(seen);
    return rc;
}

static int where(char *buf, size_t len, const Config *c, const char *name, int from_override) {
    if (from_override) return snprintf(buf, len, "command-line override '%s'", name);
    char sec[128];
    const char *dot = strchr(name, '.');
    size_t sl = dot ? (size_t)(dot - name) : 0;
    if (sl >= sizeof sec) sl = sizeof sec - 1;
    memcpy(sec, name, sl);
    sec[sl] = '\0';
    int line = find_line(c->path, sec, dot ? dot + 1 : name);
    if (line > 0) return snprintf(buf, len, "%s:%d", c->path, line);
    return snprintf(buf, len, "%s", c->path ? c->path : "(defaults)");
}

#define CONFIG_VALUE_MAX 960

static int check_value(const Config *c, size_t i, int from_override) {
    const ConfigKey *k = &c->schema[i];
    const char *v = c->value[i];
    char at[600];
    where(at, sizeof at, c, k->name, from_override);
    // Line breaks and other control characters (possible in overrides only)
    // cannot be written back to an INI file.
    for (const char *p = v; *p; p++)
        if ((unsigned char)*p < 0x20 && *p != '\t')
            return error_set("%s: %s: the value holds a control character (code %d)", at, k->name, *p);
    // Both quote characters: no INI quoting can write the value back; nor a
    // line longer than iniparser reads (1024 bytes).
    if (strchr(v, '"') && strchr(v, '\''))
        return error_set("%s: %s = '%s' holds both kinds of quotes", at, k->name, v);
    if (strlen(v) > CONFIG_VALUE_MAX)
        return error_set("%s: %s: the value is longer than %d characters", at, k->name, CONFIG_VALUE_MAX);
    switch (k->type) {
    case CFG_INT: {
        long x;
        if (str_to_long(v, &x) != 0)
            return error_set("%s: %s = '%s' is not an integer", at, k->name, v);
        if (k->lo <= k->hi && ((double)x < k->lo || (double)x > k->hi))
            return error_set("%s: %s = %ld is out of range [%g, %g]", at, k->name, x, k->lo, k->hi);
        return 0;
    }
    case CFG_FLOAT: {
        double x;
        if (str_to_double(v, &x) != 0 || x != x)
            return error_set("%s: %s = '%s' is not a number", at, k->name, v);
        if (k->lo <= k->hi && (x < k->lo || x > k->hi))
            return error_set("%s: %s = %g is out of range [%g, %g]", at, k->name, x, k->lo, k->hi);
        return 0;
    }
    case CFG_BOOL: {
        const char *ok[] = {"true", "false", "yes", "no", "1", "0", "on", "off"};
        for (size_t j = 0; j < sizeof ok / sizeof *ok; j++)
            if (strcasecmp(v, ok[j]) == 0) return 0;
        return error_set("%s: %s = '%s' is not a boolean (true or false)", at, k->name, v);
    }
    case CFG_CHOICE: {
        const char *p = k->choices;
        size_t vl = strlen(v);
        while (p && *p) {
            const char *bar = strchr(p, '|');
            size_t l = bar ? (size_t)(bar - p) : strlen(p);
            if (l == vl && strncmp(p, v, l) == 0) return 0;
            p = bar ? bar + 1 : NULL;
        }
        return error_set("%s: %s = '%s' is not one of %s", at, k->name, v, k->choices);
    }
    case CFG_STRING:
        return 0;
    }
    return 0;
}

// Numbers, booleans and choices are stored without surrounding blanks (a
// quoted ' 2e-3' means 2e-3), so that the resolved text reads back the same.
static void set_value(Config *c, size_t i, const char *v) {
    free(c->value[i]);
    c->value[i] = xstrdup(v);
    if (c->schema[i].type != CFG_STRING) {
        char *t = str_trim(c->value[i]);
        memmove(c->value[i], t, strlen(t) + 1);
    }
    c->set[i] = 1;
}

Config *config_load(const char *path, const ConfigKey *schema, size_t n_schema,
                    const char *const *overrides, size_t n_overrides) {
    Config *c = xcalloc(1, sizeof *c);
    c->schema = schema;
    c->n = n_schema;
    c->value = xcalloc(n_schema, sizeof *c->value);
    c->set = xcalloc(n_schema, sizeof *c->set);
    c->path = path ? xstrdup(path) : NULL;
    for (size_t i = 0; i < n_schema; i++) c->value[i] = xstrdup(schema[i].def);

    if (path) {
        FILE *f = fopen(path, "r");
        if (!f) {
            error_set("cannot read config file '%s'", path);
            goto fail;
        }
        fclose(f);
        if (path_is_dir(path)) {
            error_set("config '%s' is a folder, not an INI file", path);
            goto fail;
        }
        g_ini_error[0] = '\0';
        iniparser_set_error_callback(ini_error_cb);
        dictionary *d = iniparser_load(path);
        if (!d) {
            char *msg = str_trim(g_ini_error);
            for (char *p = msg; *p; p++)
                if (*p == '\n') *p = ' ';
            error_set("config '%s' is not a valid INI file: %s", path, *msg ? msg : "parse error");
            goto fail;
        }
        if (find_duplicate_key(path) != 0) {
            iniparser_freedict(d);
            goto fail;
        }
        for (ssize_t j = 0; j < d->size; j++) {
            if (!d->key[j] || !d->val[j]) continue; // empty slot or a section line
            const char *key = d->key[j];
            const char *colon = strchr(key, ':');
            if (!colon || colon == key) {
                const char *bare = colon ? colon + 1 : key;
                int line = find_line(path, "", bare);
                error_set("%s:%d: key '%s' is outside any [section]", path, line, bare);
                iniparser_freedict(d);
                goto fail;
            }
            char name[256];
            snprintf(name, sizeof name, "%.*s.%s", (int)(colon - key), key, colon + 1);
            long i = schema_find(schema, n_schema, name);
            if (i < 0) {
                char sec[128];
                snprintf(sec, sizeof sec, "%.*s", (int)(colon - key), key);
                int line = find_line(path, sec, colon + 1);
                const char *near = schema_nearest(schema, n_schema, name);
                if (near)
                    error_set("%s:%d: unknown key '%s' (did you mean '%s'?)", path, line, name, near);
                else
                    error_set("%s:%d: unknown key '%s'", path, line, name);
                iniparser_freedict(d);
                goto fail;
            }
            set_value(c, (size_t)i, d->val[j]);
            if (check_value(c, (size_t)i, 0) != 0) {
                iniparser_freedict(d);
                goto fail;
            }
        }
        iniparser_freedict(d);
    }

    for (size_t o = 0; o < n_overrides; o++) {
        const char *eq = strchr(overrides[o], '=');
        char name[256];
        if (!eq || eq == overrides[o] || (size_t)(eq - overrides[o]) >= sizeof name) {
            error_set("override '%s' is not of the form section.key=value", overrides[o]);
            goto fail;
        }
        snprintf(name, sizeof name, "%.*s", (int)(eq - overrides[o]), overrides[o]);
        for (char *p = name; *p; p++)
            if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
        long i = schema_find(schema, n_schema, name);
        if (i < 0) {
            const char *near = schema_nearest(schema, n_schema, name);
            if (near)
                error_set("unknown key '%s' in override '%s' (did you mean '%s'?)", name,
                          overrides[o], near);
            else
                error_set("unknown key '%s' in override '%s'", name, overrides[o]);
            goto fail;
        }
        // The same key twice on the command line with two values: which one
        // was meant is unclear (overriding a key of the file is what
        // overrides are for; repeating a value is harmless).
        for (size_t p = 0; p < o; p++) {
            const char *peq = strchr(overrides[p], '=');
            if (!peq || (size_t)(peq - overrides[p]) != strlen(name) ||
                strncasecmp(overrides[p], name, strlen(name)) != 0 || strcmp(peq + 1, eq + 1) == 0)
                continue;
            error_set("key '%s' is given twice on the command line with different values: '%s' and '%s'",
                      name, overrides[p], overrides[o]);
            error_set_hint("give %s once", name);
            goto fail;
        }
        set_value(c, (size_t)i, eq + 1);
        if (check_value(c, (size_t)i, 1) != 0) goto fail;
    }
    // Defaults are checked too: a bad default is a programming error, but say so.
    for (size_t i = 0; i < n_schema; i++) {
        if (!c->set[i] && check_value(c, i, 0) != 0) goto fail;
    }
    return c;
fail:
    config_free(c);
    return NULL;
}

void config_free(Config *c) {
    if (!c) return;
    for (size_t i = 0; i < c->n; i++) free(c->value[i]);
    free(c->value);
    free(c->set);
    free(c->path);
    free(c);
}

static size_t need(const Config *c, const char *name) {
    long i = schema_find(c->schema, c->n, name);
    if (i < 0) DIE("internal: config key '%s' is not in the schema", name);
    return (size_t)i;
}

long config_int(const Config *c, const char *name) {
    long x = 0;
    size_t i = need(c, name);
    CHECK(c->schema[i].type == CFG_INT, "internal: config key '%s' is not an integer", name);
    str_to_long(c->value[i], &x);
    return x;
}

double config_float(const Config *c, const char *name) {
    double x = 0;
    size_t i = need(c, name);
    CHECK(c->schema[i].type == CFG_FLOAT || c->schema[i].type == CFG_INT,
          "internal: config key '%s' is not a number", name);
    str_to_double(c->value[i], &x);
    return x;
}

int config_bool(const Config *c, const char *name) {
    size_t i = need(c, name);
    CHECK(c->schema[i].type == CFG_BOOL, "internal: config key '%s' is not a boolean", name);
    const char *v = c->value[i];
    return strcasecmp(v, "true") == 0 || strcasecmp(v, "yes") == 0 || strcmp(v, "1") == 0 ||
           strcasecmp(v, "on") == 0;
}

const char *config_str(const Config *c, const char *name) { return c->value[need(c, name)]; }

int config_is_set(const Config *c, const char *name) { return c->set[need(c, name)]; }

const char *config_path(const Config *c) { return c->path; }

// A string value as INI text: quoted when iniparser would not read it back as
// is (surrounding blanks, comment characters, quotes); check_value refuses
// values that hold both quote characters.
static const char *ini_quote(const char *v) {
    size_t n = strlen(v);
    int needs = n > 0 && (v[0] == ' ' || v[0] == '\t' || v[n - 1] == ' ' || v[n - 1] == '\t' ||
                          v[n - 1] == '\\'); // a trailing backslash continues the line
    needs = needs || strpbrk(v, ";#\"'") != NULL;
    if (!needs) return "";
    return strchr(v, '"') ? "'" : "\"";
}

char *config_to_ini(const Config *c) {
    size_t cap = 4096, len = 0;
    char *out = xmalloc(cap);
    out[0] = '\0';
    const char *section = "";
    size_t section_len = 0;
    for (size_t i = 0; i < c->n; i++) {
        const char *name = c->schema[i].name;
        const char *dot = strchr(name, '.');
        size_t sl = (size_t)(dot - name);
        const char *v = c->value[i];
        const char *q = c->schema[i].type == CFG_STRING ? ini_quote(v) : "";
        // Room for "\n[section]\n" and "key = qvalueq\n".
        size_t need = 2 * strlen(name) + strlen(v) + 16;
        while (len + need + 1 > cap) out = xrealloc(out, cap *= 2);
        if (sl != section_len || strncmp(section, name, sl) != 0) {
            section = name;
            section_len = sl;
            len += (size_t)sprintf(out + len, "%s[%.*s]\n", len ? "\n" : "", (int)sl, name);
        }
        len += (size_t)sprintf(out + len, "%s = %s%s%s\n", dot + 1, q, v, q);
    }
    return out;
}

uint64_t config_hash(const Config *c) {
    char *s = config_to_ini(c);
    uint64_t h = hash_fnv64(HASH_FNV_INIT, s, strlen(s));
    free(s);
    return h;
}

void config_print_schema(FILE *f, const ConfigKey *schema, size_t n_schema) {
    static const char *tn[] = {"int", "float", "bool", "string", "choice"};
    for (size_t i = 0; i < n_schema; i++) {
        const ConfigKey *k = &schema[i];
        fprintf(f, "  %-32s %-6s default %-12s %s", k->name, tn[k->type],
                k->def[0] ? k->def : "''", k->help);
        if (k->type == CFG_CHOICE) fprintf(f, " (%s)", k->choices);
        fputc('\n', f);
    }
}
