/** blk-img in-process: the command-line framework, and each command's behaviour without real QEMU. */
import { mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { parseImageOpts, splitOptions } from "../src/image.ts";
import { sparseRuns } from "../src/sparse.ts";
import { blk } from "./helpers.ts";

const dir = makeTempDir("blk-img");
afterAll(() => dir.dispose());
let n = 0;
const path = (name: string): string => dir.join(`${n++}-${name}`);

describe("framework", () => {
  it("--help and -h print the usage (exit 0), as does a command's -h", async () => {
    for (const argv of [["--help"], ["-h"]]) {
      const r = await blk(argv);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^usage: blk-img /);
      for (const c of ["create", "info", "map", "compare", "convert", "resize", "check"]) {
        expect(r.stdout).toContain(`  ${c} `);
      }
    }
    const r = await blk(["info", "-h"]);
    expect(r).toEqual({ code: 0, stdout: expect.stringMatching(/^usage: blk-img info /), stderr: "" });
  });

  it("--version and -V name the package version and the qemu-img it follows", async () => {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as {
      version: string;
    };
    for (const argv of [["--version"], ["-V"]]) {
      const r = await blk(argv);
      expect(r).toEqual({
        code: 0,
        stdout: `blk-img version ${pkg.version} (compatible with qemu-img 7.2.0)\n`,
        stderr: "",
      });
    }
  });

  it("usage errors: one line plus the Try line, exit 1", async () => {
    const t = "Try 'blk-img --help' for more information\n";
    expect(await blk([])).toEqual({ code: 1, stdout: "", stderr: `blk-img: Not enough arguments\n${t}` });
    expect(await blk(["frob"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `blk-img: Command not found: frob\n${t}`,
    });
    expect(await blk(["--bogus"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `blk-img: unrecognized option '--bogus'\n${t}`,
    });
    expect(await blk(["info", "-f"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `blk-img: missing argument for option '-f'\n${t}`,
    });
    // -T (trace) is accepted before the command.
    expect((await blk(["-T", "x", "--version"])).code).toBe(0);
  });

  it("never prints a stack trace: failures end in one blk-img: line", async () => {
    const d = path("dir");
    mkdirSync(d);
    for (const argv of [
      ["info", d],
      ["map", "-f", "nosuchfmt", d],
      ["convert", d, path("x.raw")],
      ["compare", d, d],
      ["resize", "-f", "raw", d, "1M"],
      ["info", "--image-opts", "driver=nosuch"],
      ["info", "--image-opts", "file.filename=x"],
    ]) {
      const r = await blk(argv);
      expect(r.code).toBeGreaterThan(0);
      expect(r.stderr).toMatch(/^blk-img: [^\n]+\n$/);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
  });
});

describe("commands on raw images", () => {
  it("create, info, resize, map, compare, check, convert round trip", async () => {
    const a = path("a.raw");
    expect(await blk(["create", "-f", "raw", a, "1000"])).toEqual({
      code: 0,
      stdout: `Formatting '${a}', fmt=raw size=1000\n`,
      stderr: "",
    });
    expect(statSync(a).size).toBe(1024);
    const info = JSON.parse((await blk(["info", "--output=json", "-f", "raw", a])).stdout) as Record<
      string,
      unknown
    >;
    expect(info).toMatchObject({ "virtual-size": 1024, filename: a, format: "raw", "dirty-flag": false });
    expect(await blk(["resize", "-f", "raw", a, "+1M"])).toEqual({
      code: 0,
      stdout: "Image resized.\n",
      stderr: "",
    });
    expect(statSync(a).size).toBe(1024 + (1 << 20));
    const shrink = await blk(["resize", "-f", "raw", a, "--", "-1k"]);
    expect(shrink.code).toBe(1);
    expect(shrink.stderr).toMatch(/^blk-img: Use the --shrink option to perform a shrink operation.\n/);
    expect((await blk(["resize", "-q", "-f", "raw", "--shrink", a, "1M"])).stdout).toBe("");
    expect(statSync(a).size).toBe(1 << 20);

    const src = path("src.raw");
    writeFileSync(src, pattern(9, 0, 3 << 20));
    const dst = path("dst.raw");
    expect(await blk(["convert", "-f", "raw", "-O", "raw", src, dst])).toEqual({
      code: 0,
      stdout: "",
      stderr: "",
    });
    expect(readFileSync(dst).equals(readFileSync(src))).toBe(true);
    expect(await blk(["compare", src, dst])).toEqual({
      code: 0,
      stdout: "Images are identical.\n",
      stderr: "",
    });
    const other = path("other.raw");
    const data = pattern(9, 0, 3 << 20);
    data[1000] = (data[1000] ?? 0) ^ 1;
    writeFileSync(other, data);
    expect(await blk(["compare", src, other])).toEqual({
      code: 1,
      stdout: "Content mismatch at offset 512!\n",
      stderr: "",
    });
    expect((await blk(["compare", "-q", src, other])).stdout).toBe("");
    expect((await blk(["compare", src, path("missing.raw")])).code).toBe(2);

    const map = await blk(["map", "--output=json", "-f", "raw", dst]);
    expect(map.code).toBe(0);
    const entries = map.stdout
      .trim()
      .slice(1, -1)
      .split(",\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(entries.reduce((s, e) => s + Number(e.length), 0)).toBe(3 << 20);
    expect(map.stdout).toMatch(
      /^\[\{ "start": 0, "length": \d+, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0\}/,
    );

    expect(await blk(["check", "-f", "raw", dst])).toEqual({
      code: 63,
      stdout: "",
      stderr: "blk-img: This image format does not support checks\n",
    });
  });

  it("QEMU formats without a creating driver in the registry: a clear error, nothing created", async () => {
    const f = path("x.vdi");
    expect(await blk(["create", "-f", "vdi", f, "64M"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `blk-img: ${f}: Creating 'vdi' images is not supported by blk-img yet\n`,
    });
    const src = path("s.raw");
    writeFileSync(src, new Uint8Array(4096));
    expect(await blk(["convert", "-O", "vmdk", src, f])).toEqual({
      code: 1,
      stdout: "",
      stderr: "blk-img: Creating 'vmdk' images is not supported by blk-img yet\n",
    });
    expect((await blk(["create", "-f", "nosuch", f, "1M"])).stderr).toBe(
      `blk-img: ${f}: Unknown file format 'nosuch'\n`,
    );
    expect(() => statSync(f)).toThrow();
  });

  it("-p on a terminal draws a bar instead of qemu-img's (P/100%) lines", async () => {
    const src = path("p.raw");
    writeFileSync(src, pattern(3, 0, 4 << 20));
    const r = await blk(["convert", "-p", src, path("p2.raw")], { isTTY: true });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/\r\[#+\] 100\.00%/);
    expect(r.stdout).not.toContain("/100%)");
    expect(r.stdout.endsWith("\n")).toBe(true);
    const c = await blk(["compare", "-p", src, src], { isTTY: true });
    expect(c.code).toBe(0);
    expect(c.stdout).toMatch(/100\.00% .*\nImages are identical\.\n$/s);
  });
});

describe("helpers", () => {
  it("splits QEMU option strings and nests --image-opts keys", () => {
    expect(splitOptions("a=1,b=x,,y,flag")).toEqual([
      ["a", "1"],
      ["b", "x,y"],
      ["flag", undefined],
    ]);
    expect(parseImageOpts("driver=raw,file.filename=/tmp/x,offset=512,read-only=on")).toEqual({
      driver: "raw",
      file: { driver: "file", filename: "/tmp/x" },
      offset: 512,
      "read-only": true,
    });
  });

  it("finds qemu-img convert's zero runs", () => {
    const buf = new Uint8Array(16 * 512);
    buf.fill(1, 0, 512);
    buf.fill(1, 4096, 4608);
    // -S 4k: 8-sector alignment; data runs end aligned up, the zero run between is absorbed.
    expect(sparseRuns(buf, 0, 8, 8)).toEqual([{ start: 0, end: 8192, zero: false }]);
    // -S 512: sector grid; both zero runs are long enough.
    expect(sparseRuns(buf, 0, 1, 1)).toEqual([
      { start: 0, end: 512, zero: false },
      { start: 512, end: 4096, zero: true },
      { start: 4096, end: 4608, zero: false },
      { start: 4608, end: 8192, zero: true },
    ]);
    expect(sparseRuns(new Uint8Array(4096), 0, 8, 8)).toEqual([{ start: 0, end: 4096, zero: true }]);
  });
});
