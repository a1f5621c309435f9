import { readFileSync } from "node:fs";
import { expect, it } from "vitest";

// The README's example is test/readme.test.ts verbatim, so the example that runs is the one users read.
it("the README's Example block is test/readme.test.ts", () => {
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  const example = readme.slice(readme.indexOf("## Example"));
  const block = /```ts\n([\s\S]*?)```/.exec(example)?.[1];
  expect(block).toBe(readFileSync(new URL("./readme.test.ts", import.meta.url), "utf8"));
});
