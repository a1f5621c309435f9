#!/usr/bin/env node
// Scaffolds a workspace package from one template and wires it into the solution tsconfigs.
//   pnpm new-package <name> [--dir packages|apps|tests] [--deps core,hbitmap] [--private] [--description "…"]
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    dir: { type: "string", default: "packages" },
    deps: { type: "string", default: "" },
    private: { type: "boolean", default: false },
    description: { type: "string", default: "" },
  },
});
const name = positionals[0];
if (!name || !/^[a-z][a-z0-9-]*$/.test(name)) {
  console.error(
    "usage: new-package <name> [--dir packages|apps|tests] [--deps a,b] [--private] [--description text]",
  );
  process.exit(2);
}
const pkgDir = join(root, values.dir, name);
if (existsSync(pkgDir)) {
  console.error(`new-package: ${relative(root, pkgDir)} already exists`);
  process.exit(1);
}
const deps = values.deps ? values.deps.split(",").filter(Boolean) : [];
const fullName = `@blk/${name}`;
const rel = (p) => relative(pkgDir, p).split("\\").join("/");
const write = (file, text) => {
  mkdirSync(dirname(join(pkgDir, file)), { recursive: true });
  writeFileSync(join(pkgDir, file), text);
};
const json = (v) => `${JSON.stringify(v, null, 2)}\n`;

const manifest = {
  name: fullName,
  version: "0.1.0",
  description: values.description || `${fullName}`,
  license: "MIT",
  type: "module",
  sideEffects: false,
  exports: {
    ".": { "@blk/source": "./src/index.ts", types: "./dist/index.d.ts", default: "./dist/index.js" },
    "./internal/*": null,
    "./package.json": "./package.json",
  },
  files: ["dist", "src"],
  engines: { node: ">=20.19" },
  ...(values.private ? { private: true } : { publishConfig: { access: "public" } }),
  repository: { type: "git", url: "git+https://example.invalid/blk.git", directory: `${values.dir}/${name}` },
  scripts: {
    build: "tsc -b",
    test: "vitest run",
    // passes until the first bench/*.bench.ts exists (vitest bench fails when it finds no file)
    bench: "vitest bench --run --passWithNoTests",
    ...(values.private ? {} : { "check:pkg": "publint --strict && attw --pack . --profile esm-only" }),
  },
  dependencies: Object.fromEntries(deps.map((d) => [`@blk/${d}`, "workspace:^"])),
  devDependencies: { "@blk/tsconfig": "workspace:*" },
};
if (deps.length === 0) delete manifest.dependencies;
write("package.json", json(manifest));
write(
  "tsconfig.json",
  json({
    extends: "@blk/tsconfig/base.json",
    include: ["src"],
    references: deps.map((d) => ({ path: rel(join(root, "packages", d)) })),
  }),
);
write(
  "vitest.config.ts",
  `import { blkProject } from "${rel(join(root, "tooling/vitest/project.ts"))}";\n\nexport default blkProject("${fullName}");\n`,
);
write("src/index.ts", `/** ${values.description || fullName} */\nexport {};\n`);
// The README example is test/readme.test.ts verbatim (style.md "Docs"); test/readme-sync.test.ts keeps the
// two identical. The starting example fails as soon as the package exports something, so that it gets
// replaced by a real one.
const example = `import { expect, it } from "vitest";
import * as pkg from "../src/index.ts";

it("README example", () => {
  // Replace with a short, real use of the API; README.md's Example block must stay identical to this file.
  expect(Object.keys(pkg)).toEqual([]);
});
`;
write("test/readme.test.ts", example);
write(
  "test/readme-sync.test.ts",
  `import { readFileSync } from "node:fs";
import { expect, it } from "vitest";

// The README's example is test/readme.test.ts verbatim, so the example that runs is the one users read.
it("the README's Example block is test/readme.test.ts", () => {
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  const example = readme.slice(readme.indexOf("## Example"));
  const block = /\`\`\`ts\\n([\\s\\S]*?)\`\`\`/.exec(example)?.[1];
  expect(block).toBe(readFileSync(new URL("./readme.test.ts", import.meta.url), "utf8"));
});
`,
);
write(
  "bench/README.md",
  `# ${fullName} benchmarks\n\n\`bench/*.bench.ts\`, run with \`pnpm -F ${fullName} bench\`. Each file first checks that the code\nmeasured agrees with a reference implementation, then prints same-run ratios against it.\n\n## What is measured\n\n## What is not\n`,
);
write(
  "README.md",
  `# ${fullName}\n\n${values.description || "One-line purpose."}\n\n\`\`\`sh\nnpm install ${fullName}\n\`\`\`\n\n## Example\n\n(The example below is also \`test/readme.test.ts\`.)\n\n\`\`\`ts\n${example}\`\`\`\n\n## Exports\n\n## Errors\n\n## Limits\n`,
);

// Wire the package into the solution tsconfig and the test tsconfig.
const addRef = (file, path) => {
  const p = join(root, file);
  const cfg = JSON.parse(readFileSync(p, "utf8"));
  cfg.references ??= [];
  if (!cfg.references.some((r) => r.path === path)) cfg.references.push({ path });
  cfg.references.sort((a, b) =>
    a.path === "tsconfig.test.json" ? 1 : b.path === "tsconfig.test.json" ? -1 : a.path.localeCompare(b.path),
  );
  writeFileSync(p, json(cfg));
};
addRef("tsconfig.json", `${values.dir}/${name}`);
addRef("tsconfig.test.json", `${values.dir}/${name}`);
// Leave the new files as the formatter wants them (JSON arrays folded, etc.).
const biome = join(root, "node_modules", ".bin", "biome");
if (existsSync(biome)) {
  spawnSync(
    biome,
    ["check", "--write", pkgDir, join(root, "tsconfig.json"), join(root, "tsconfig.test.json")],
    { stdio: "ignore" },
  );
}
console.log(`created ${relative(root, pkgDir)}; run pnpm install`);
