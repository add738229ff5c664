#!/usr/bin/env bash
# The code's shape, in counts anyone can reproduce: scripts/shape.sh [--list-pub]
#
# Not part of .ci/run: it needs cargo-modules, which the project does not
# require. Install it once with
#     cargo install cargo-modules --locked
# (cargo-modules 0.28 needs rustc 1.98; on an older toolchain add
# `--version 0.27.0`, which this script was written against).
#
# What it counts, and how:
#
# - Modules and their imports come from `cargo modules dependencies --lib`
#   (rust-analyzer's view of the library crate, `#[cfg(test)]` left out):
#   every module is a node, and a "uses" edge A -> B means a `use` in A names B
#   or an item of B. Edges between a module and its own ancestors or
#   descendants are set aside: a parent declaring and re-exporting its
#   children, and children reaching `super::`, is the module tree itself,
#   not a boundary between parts.
# - Module pairs importing each other: both A -> B and B -> A. Listed, with
#   the same count one level up, between the top-level areas (`sessions`,
#   `jobs`, ...). A pair that stays on purpose goes in JUSTIFIED_PAIRS below,
#   with a comment saying why; the list marks which ones are.
# - Import cycles: the cycles through three or more modules that remain once
#   the mutual pairs' edges are set aside (those are counted above), each
#   listed as a -> b -> c. "Knots" are the strongly connected sets of modules
#   with every edge kept: how much of the crate hangs together, pairs included.
# - Functions over 80 lines: no maintained tool reports Rust function lengths,
#   so a small scanner below reads src/ itself: it blanks comments, strings
#   and char literals, finds each `fn name ... {` and matches its braces.
#   Length runs from the `fn` line to the closing brace (attributes and doc
#   comments not counted; closures count toward their function; a nested fn
#   is counted on its own too). Unit-test modules (`#[cfg(test)] mod`) are
#   left out.
# - `pub` items outside the API. The API is what the library's users name:
#   the binary (src/main.rs and the modules main.rs declares itself), tests/
#   and benches/. A library item declared plain `pub` (fn, struct, enum,
#   trait, type, const, static, mod, union; not `pub use` re-exports, fields
#   or variants) whose name appears as a word in none of those files (comments
#   and strings blanked) is outside the API: it could be `pub(crate)`. A name
#   shared with something the users do name (`new`, `Config`) counts as used,
#   so the figure is a lower bound. Per area: plain `pub`, of them `pub fn`,
#   `pub(crate)`, `pub(super)`/`pub(in ...)`, and `pub` outside the API.
#   `--list-pub` lists those items.
#
# The last lines are a summary block; the script exits 0 whatever the counts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_cargo
need_cmd python3 "apt-get install python3"
if ! cargo modules --version >/dev/null 2>&1; then
    die "cargo-modules is not installed. Install it with:
    CARGO_BUILD_JOBS=1 cargo install cargo-modules --locked
(cargo-modules 0.28 needs rustc 1.98 or newer; with an older rustc add --version 0.27.0)"
fi

# Module pairs that import each other on purpose, one per line as
# `a::b c::d  # why`, module paths without the crate name. Keep it short.
JUSTIFIED_PAIRS='
'

dot=$(mktemp)
trap 'rm -f "$dot"' EXIT
say "reading the module graph with $(cargo modules --version) (about half a minute)"
# No --layout flag: with `--layout none` cargo-modules 0.27 prints nothing.
cargo modules dependencies --lib --no-externs --no-sysroot --no-fns --no-traits --no-types \
    >"$dot" 2>/dev/null || die "cargo modules dependencies failed; run it by hand to see why"
[[ -s "$dot" ]] || die "cargo modules dependencies printed no graph"

JUSTIFIED_PAIRS=$JUSTIFIED_PAIRS python3 - "$dot" "$@" <<'PY'
import os, re, sys

FN_LINES = 80

def strip(src):
    """Blank comments and the contents of string and char literals (keeping
    newlines and the quote characters), so braces and words inside them
    count for nothing."""
    out = []
    i, n = 0, len(src)
    def blank(s):
        return ''.join('\n' if c == '\n' else ' ' for c in s)
    while i < n:
        c = src[i]
        nxt = src[i + 1] if i + 1 < n else ''
        if c == '/' and nxt == '/':
            j = src.find('\n', i)
            j = n if j < 0 else j
            out.append(blank(src[i:j])); i = j; continue
        if c == '/' and nxt == '*':
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith('/*', j): depth += 1; j += 2
                elif src.startswith('*/', j): depth -= 1; j += 2
                else: j += 1
            out.append(blank(src[i:j])); i = j; continue
        prev = src[i - 1] if i else ' '
        m = re.match(r'b?r(#*)"', src[i:i + 300]) if c in 'br' and not (prev.isalnum() or prev == '_') else None
        if m:
            close = '"' + m.group(1)
            j = src.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append(blank(src[i:j])); i = j; continue
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == '\\' else 1
            out.append('"' + blank(src[i + 1:j]) + '"'); i = j + 1; continue
        if c == "'":
            if nxt == '\\':
                j = src.find("'", i + 3)
                out.append(blank(src[i:j + 1])); i = j + 1; continue
            if i + 2 < n and src[i + 2] == "'":
                out.append('   '); i += 3; continue
        out.append(c); i += 1
    return ''.join(out)

def match_brace(s, k):
    depth = 0
    for j in range(k, len(s)):
        if s[j] == '{': depth += 1
        elif s[j] == '}':
            depth -= 1
            if depth == 0: return j
    return len(s) - 1

def test_ranges(s):
    """Spans of `#[cfg(test)]` items (unit-test modules), left out of both counts."""
    spans = []
    for m in re.finditer(r'#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{', s):
        spans.append((m.start(), match_brace(s, m.end() - 1)))
    return spans

def inside(spans, p):
    return any(a <= p <= b for a, b in spans)

def rs_files(root):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ('node_modules', 'target'))
        for f in sorted(files):
            if f.endswith('.rs'):
                yield os.path.join(d, f)

FN = re.compile(r'\bfn\s+([A-Za-z_]\w*)')
def functions(path, s):
    spans = test_ranges(s)
    for m in FN.finditer(s):
        if inside(spans, m.start()): continue
        paren, j = 0, m.end()
        while j < len(s):
            ch = s[j]
            if ch in '([': paren += 1
            elif ch in ')]': paren -= 1
            elif paren == 0 and ch in '{;': break
            j += 1
        if j >= len(s) or s[j] == ';': continue  # a declaration without a body
        end = match_brace(s, j)
        first = s.count('\n', 0, m.start()) + 1
        last = s.count('\n', 0, end) + 1
        yield (path, first, m.group(1), last - first + 1)

PUB = re.compile(r'\bpub(\s*\([^)]*\))?\s+(?:(?:async|unsafe|extern\s*"[^"]*")\s+)*'
                 r'(const\s+fn|const\s+unsafe\s+fn|fn|struct|enum|trait|type|const|static|mod|union)\s+([A-Za-z_]\w*)')
def pub_items(path, s):
    spans = test_ranges(s)
    for m in PUB.finditer(s):
        if inside(spans, m.start()): continue
        vis = re.sub(r'\s', '', m.group(1) or '')
        vis = 'pub' if not vis else ('pub(crate)' if vis == '(crate)' else 'pub(super/in)')
        kind = 'fn' if m.group(2).endswith('fn') else m.group(2)
        yield (path, s.count('\n', 0, m.start()) + 1, vis, kind, m.group(3))

def area(path):
    rel = os.path.relpath(path, 'src')
    top = rel.split(os.sep)[0]
    return top[:-3] if top.endswith('.rs') else top

def bin_files():
    """main.rs and the modules it declares itself (the binary's own code)."""
    files = ['src/main.rs']
    s = strip(open('src/main.rs').read())
    for m in re.finditer(r'^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', s, re.M):
        name = m.group(1)
        if os.path.exists(f'src/{name}.rs'): files.append(f'src/{name}.rs')
        if os.path.isdir(f'src/{name}'): files.extend(rs_files(f'src/{name}'))
    return files


# ---- the module graph ------------------------------------------------------

def module_edges(dot):
    edges = set()
    for m in re.finditer(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"', dot, re.M):
        a, b = (x.split('::', 1)[1] if '::' in x else x for x in m.groups())
        related = a == b or b.startswith(a + '::') or a.startswith(b + '::')
        if not related:
            edges.add((a, b))
    return edges

def mutual_pairs(edges):
    return sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})

def knots(edges):
    """Strongly connected sets of two or more modules (Tarjan, iterative)."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]; counter[0] += 1
                stack.append(v); on.add(v)
            succ = sorted(graph[v])
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return sorted(out, key=lambda c: (-len(c), c))

def cycles(edges, cap=1000):
    """Elementary cycles, each once (from its smallest module), at most cap."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack and len(found) < cap:
            v, path = stack.pop()
            for w in sorted(graph.get(v, ())):
                if w == start:
                    found.append(path)
                elif w > start and w not in path:
                    stack.append((w, path + [w]))
    return found

def area_of_module(m):
    return m.split('::')[0]

def main():
    dot = open(sys.argv[1]).read()
    args = sys.argv[2:]
    justified = {}
    for line in os.environ.get('JUSTIFIED_PAIRS', '').splitlines():
        words = line.split('#')[0].split()
        if len(words) == 2:
            justified[tuple(sorted(words))] = line.split('#', 1)[1].strip() if '#' in line else ''

    edges = module_edges(dot)
    modules = re.findall(r'// "mod" node$', dot, re.M)
    pairs = mutual_pairs(edges)
    pair_edges = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    loops = cycles(edges - pair_edges)
    tangles = knots(edges)
    area_edges = {(area_of_module(a), area_of_module(b)) for a, b in edges
                  if area_of_module(a) != area_of_module(b)}
    area_pairs = mutual_pairs(area_edges)

    print(f'## Module pairs importing each other: {len(pairs)} '
          f'({sum(p in justified for p in pairs)} justified in JUSTIFIED_PAIRS)')
    for a, b in pairs:
        why = justified.get((a, b))
        print(f'  {a} <-> {b}' + (f'  # {why}' if why is not None else ''))
    print(f'## Import cycles through three or more modules, pairs set aside: {len(loops)}'
          + (' (listing capped)' if len(loops) >= 1000 else ''))
    for c in loops:
        print('  ' + ' -> '.join(c + [c[0]]))
    print(f'## Knots (strongly connected modules, every edge kept): {len(tangles)}')
    for k in tangles:
        print(f'  {len(k)} modules: ' + ', '.join(k))
    print(f'## Top-level areas importing each other: {len(area_pairs)}')
    print('  ' + ', '.join(f'{a}<->{b}' for a, b in area_pairs))

    bins = set(bin_files())
    texts = {p: strip(open(p).read()) for p in rs_files('src')}
    long_fns = sorted((f for p in texts for f in functions(p, texts[p]) if f[3] > FN_LINES),
                      key=lambda f: (-f[3], f[0], f[1]))
    print(f'## Functions over {FN_LINES} lines (src/, unit-test modules left out): {len(long_fns)}')
    for p, line, name, length in long_fns:
        print(f'  {p}:{line} {name} {length}')

    users = [texts[p] for p in bins]
    for root in ('tests', 'benches'):
        if os.path.isdir(root):
            users += [strip(open(p).read()) for p in rs_files(root)]
    used = set(re.findall(r'[A-Za-z_]\w*', '\n'.join(users)))
    items = [it for p in texts if p not in bins for it in pub_items(p, texts[p])]
    outside = [it for it in items if it[2] == 'pub' and it[4] not in used]
    cols = ('pub', 'pub fn', 'pub(crate)', 'pub(super/in)', 'outside')
    per = {}
    for p, line, vis, kind, name in items:
        row = per.setdefault(area(p), dict.fromkeys(cols, 0))
        row[vis] += 1
        if vis == 'pub' and kind == 'fn':
            row['pub fn'] += 1
    for it in outside:
        per[area(it[0])]['outside'] += 1
    total = {c: sum(r[c] for r in per.values()) for c in cols}
    print('## pub items per area of the library')
    print(f'  {"area":<12} {"pub":>5} {"pub fn":>7} {"pub(crate)":>11} {"pub(super/in)":>14} {"outside API":>12}')
    for name, row in sorted(per.items()) + [('total', total)]:
        print(f'  {name:<12} ' + ' '.join(f'{row[c]:>{w}}' for c, w in zip(cols, (5, 7, 11, 14, 12))))
    if '--list-pub' in args:
        print('## pub items outside the API')
        for p, line, vis, kind, name in outside:
            print(f'  {p}:{line} {kind} {name}')

    print('== shape summary ==')
    print(f'modules (library):                     {len(modules)}')
    print(f'import cycles (3+ modules):            {len(loops)}')
    print(f'module pairs importing each other:     {len(pairs)} ({sum(p in justified for p in pairs)} justified)')
    print(f'modules in knots:                      {sum(len(k) for k in tangles)} in {len(tangles)} knot(s)')
    print(f'top-level area pairs:                  {len(area_pairs)}')
    print(f'functions over {FN_LINES} lines:               {len(long_fns)}')
    print(f'pub items / pub fn / pub(crate):       {total["pub"]} / {total["pub fn"]} / {total["pub(crate)"]}')
    print(f'pub items outside the API:             {total["outside"]}')

main()
PY
