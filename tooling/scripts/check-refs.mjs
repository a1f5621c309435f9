#!/usr/bin/env node
// Checks that every workspace package's tsconfig references match its @blk/* dependencies,
// and that the solution tsconfig references every package with a tsconfig.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const byName = new Map();
for (const group of ["packages", "apps", "tests"]) {
  const g = join(root, group);
  if (!existsSync(g)) continue;
  for (const d of readdirSync(g)) {
    const pj = join(g, d, "package.json");
    if (existsSync(pj)) byName.set(JSON.parse(readFileSync(pj, "utf8")).name, join(g, d));
  }
}
let bad = 0;
const solution = JSON.parse(readFileSync(join(root, "tsconfig.json"), "utf8"));
const solved = new Set((solution.references ?? []).map((r) => resolve(root, r.path)));
for (const [name, dir] of byName) {
  const tsc = join(dir, "tsconfig.json");
  if (!existsSync(tsc)) continue;
  if (!solved.has(dir)) {
    console.error(`${name}: missing from the root tsconfig.json references`);
    bad++;
  }
  const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  const deps = Object.keys({ ...pkg.dependencies, ...pkg.peerDependencies }).filter((d) => byName.has(d));
  const refs = (JSON.parse(readFileSync(tsc, "utf8")).references ?? []).map((r) => resolve(dir, r.path));
  const want = new Set(deps.map((d) => byName.get(d)));
  const problems = [
    ...[...want]
      .filter((w) => !refs.includes(w))
      .map((w) => `depends on ${relative(root, w)} but its tsconfig does not reference it`),
    ...refs
      .filter((r) => !want.has(r))
      .map((r) => `references ${relative(root, r)} but does not depend on it`),
  ];
  for (const p of problems) console.error(`${name}: ${p}`);
  bad += problems.length;
}
if (bad) process.exit(1);
console.log(`check-refs: ${byName.size} packages consistent`);
