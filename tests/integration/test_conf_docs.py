# test_conf_docs.py: every configuration key is in src/conf.c, etc/resourced.conf and resourced.conf(5) alike, with the same default and range.
#
# The three are written by hand; an operator reads one of the documents and the
# daemon obeys conf.c. This reads conf.c's table (section, key, bounds, default),
# the example file's `key = value` lines and the ranges in its comments, and the
# man page's key entries with their "Default:" and "N to M", and says which key
# differs where. It starts no process.
import os
import re
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=60)


def read(rel):
    with open(os.path.join(h.SRCDIR, rel)) as f:
        return f.read()


def c_number(expr):
    """The value of one of conf.c's bound expressions: 65536, 1 << 30, INT64_C(1) << 50, 30 * 86400."""
    expr = re.sub(r"\(int64_t\)|INT64_C\((\d+)\)", r"\1", expr).strip()
    if not re.fullmatch(r"[0-9<* ()]+", expr):
        raise ValueError("unexpected bound %r" % expr)
    return int(eval(expr))   # digits, <<, * and parentheses only (checked above)


def doc_number(text):
    """A number as the documents write it: 1048576, 2^40, 1073741824."""
    text = text.strip()
    m = re.fullmatch(r"2\^(\d+)", text)
    return 1 << int(m.group(1)) if m else int(text)


# ---------------------------------------------------------------- src/conf.c: the truth
code = {}
table = re.search(r"conf_keys\[\] = \{(.*?)\n\};", read("src/conf.c"), re.S).group(1)
# A default spelled as a macro ("X_TEXT", the text of the number X in a header) is that number.
macros = dict(re.findall(r"#define (\w+) (\d+)\b", read("src/frame.h")))
for m in re.finditer(r'\{ "(\w+)", "(\w+)", (T_\w+), (?:[SN]\(\w+\)|0, 0), ([^,]+), ([^,]+), (?:"([^"]*)"|(\w+)_TEXT)',
                     table):
    section, key, ctype, lo, hi, default, macro = m.groups()
    if default is None:
        default = macros.get(macro, "?" + macro)
    numeric = ctype in ("T_INT", "T_INT64", "T_WORKERS")
    code[(section, key)] = {"default": default,
                            "range": (c_number(lo), c_number(hi)) if numeric else None}
tap.ok(len(code) >= 50, "conf.c's key table was read (%d keys)" % len(code))

# ---------------------------------------------------------------- etc/resourced.conf
example, example_ranges = {}, {}
section, comment = None, []
for line in read("etc/resourced.conf").splitlines():
    if re.fullmatch(r"\[(\w+)\]", line.strip()):
        section, comment = line.strip()[1:-1], []
    elif line.startswith("#"):
        comment.append(line[1:])
    elif "=" in line and section:
        key, value = (s.strip() for s in line.split("=", 1))
        example[(section, key)] = value
        text = " ".join(comment)
        m = re.search(r"[(;] ?(0, or )?(2\^\d+|\d+)-(2\^\d+|\d+)[);]", text)
        if m:   # "0, or A-B": off, or a range (conf_load refuses the gap)
            example_ranges[(section, key)] = (0 if m.group(1) else doc_number(m.group(2)), doc_number(m.group(3)))
        comment = []
    elif not line.strip():
        comment = []

# ---------------------------------------------------------------- man/resourced.conf.5
man, man_ranges = {}, {}
section, current, body, also = None, None, [], []


def man_entry_done():
    if current is None:
        return
    for alias in also:   # .TQ: several keys described by one entry
        man_entry_done_for(alias)
    man_entry_done_for(current)


def man_entry_done_for(current):
    text = re.sub(r"\\f[BIRP]|\\-|\\&|\\%", lambda x: "-" if x.group(0) == "\\-" else "", " ".join(body))
    text = re.sub(r"^\.\w+ ?", "", text)
    text = re.sub(r" \.(?:B|BR|I|IR|RB|BI|IB) ", " ", " " + text)
    m = re.search(r"Default: ?(?:\.B )?(empty|\S+?)[ .,]*(?:\(|$| )", text)
    if m:
        man[current] = "" if m.group(1) == "empty" else m.group(1).strip('"')
    m = re.search(r"(0 \(off\),\s+or )?\b(2\^\d+|\d+)(?: \([^)]*\))? to (2\^\d+|\d+)\b", text)
    if m:
        man_ranges[current] = (0 if m.group(1) else doc_number(m.group(2)), doc_number(m.group(3)))


for raw in read("man/resourced.conf.5").splitlines():
    m = re.match(r'\.SH "\[(\w+)\] SECTION"', raw)
    if m or raw.startswith(".SH"):
        man_entry_done()
        section, current, body, also = (m.group(1) if m else None), None, [], []
        continue
    m = re.match(r"\.B[IR] (\w+) \" = ", raw)
    if m and section:
        if body == [".TQ"]:
            also.append(current)
        else:
            man_entry_done()
            also = []
        current, body = (section, m.group(1)), []
        continue
    if current:
        body.append(raw)

# ---------------------------------------------------------------- compare
tap.section("every key is documented in both places, and nothing else")
for where, keys in (("etc/resourced.conf", example), ("resourced.conf(5)", man)):
    missing = sorted("[%s] %s" % k for k in code if k not in keys)
    extra = sorted("[%s] %s" % k for k in keys if k not in code)
    tap.ok(not missing, "%s documents every key of conf.c" % where, "missing: %s" % ", ".join(missing))
    tap.ok(not extra, "%s documents no key conf.c lacks" % where, "unknown to conf.c: %s" % ", ".join(extra))

tap.section("the defaults agree")
for where, keys in (("etc/resourced.conf", example), ("resourced.conf(5)", man)):
    wrong = ["[%s] %s: %r, conf.c %r" % (k + (keys[k], v["default"]))
             for k, v in sorted(code.items()) if k in keys and keys[k] != v["default"]]
    tap.ok(not wrong, "%s shows conf.c's default of every key" % where, "\n".join(wrong))

tap.section("the ranges agree")
for where, ranges in (("etc/resourced.conf", example_ranges), ("resourced.conf(5)", man_ranges)):
    wrong = ["[%s] %s: %d-%d, conf.c %d-%d" % (k + ranges[k] + v["range"])
             for k, v in sorted(code.items()) if v["range"] and k in ranges and ranges[k] != v["range"]]
    tap.ok(not wrong, "%s gives conf.c's range of every number it bounds" % where, "\n".join(wrong))
    unbounded = sorted("[%s] %s" % k for k, v in code.items() if v["range"] and k not in ranges)
    tap.ok(not unbounded, "%s gives the range of every number" % where, "no range: %s" % ", ".join(unbounded))

tap.finish()
