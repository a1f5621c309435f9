import { readFileSync } from "node:fs";
import { makeTempDir } from "@blk/testkit";
import { expect, it } from "vitest";
import { main } from "../src/index.ts";

it("README example", async () => {
  await using dir = makeTempDir("readme");
  const disk = dir.join("disk.raw");
  const copy = dir.join("copy.raw");

  // main() takes qemu-img's argv and returns its exit code; output goes to the io given (default: the process's).
  let out = "";
  const io = { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (out += s) } };

  expect(await main(["create", "-f", "raw", disk, "64M"], io)).toBe(0);
  expect(out).toBe(`Formatting '${disk}', fmt=raw size=67108864\n`);

  expect(await main(["convert", "-f", "raw", "-O", "raw", disk, copy], io)).toBe(0);
  out = "";
  expect(await main(["compare", disk, copy], io)).toBe(0);
  expect(out).toBe("Images are identical.\n");

  out = "";
  expect(await main(["info", "--output=json", "-f", "raw", copy], io)).toBe(0);
  expect(JSON.parse(out)).toMatchObject({ "virtual-size": 67108864, format: "raw", "dirty-flag": false });

  out = "";
  expect(await main(["check", "-f", "raw", copy], io)).toBe(63);
  expect(out).toBe("blk-img: This image format does not support checks\n");
  expect(readFileSync(copy).length).toBe(64 << 20);
});
