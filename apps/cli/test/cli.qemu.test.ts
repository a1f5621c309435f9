/**
 * blk-img against qemu-img 7.2 on the same raw files (sparse, dense, zero-filled): exit codes, JSON
 * (parsed) and, where qemu-img's text is the interface, the exact text.
 */
import { mkdirSync, statSync, writeFileSync } from "node:fs";
import { getDriver } from "@blk/drivers";
import { run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { both, Fixtures, missing, qemu, qemuIo } from "./qemu.ts";

const fx = new Fixtures("blk-img-qemu");
afterAll(() => fx.dispose());

describe.skipIf(missing.length > 0)("blk-img vs qemu-img", { timeout: 120_000 }, () => {
  describe("create", () => {
    it.each([
      ["1000"],
      ["1M"],
      ["1.5M"],
      ["0.5k"],
      ["0x10"],
      ["1b"],
      ["0"],
      ["abc"],
      ["1.5"],
      ["1kb"],
      ["16E"],
      ["8E"],
    ])("size %s: same line, exit code, messages and file", async (size) => {
      const qf = fx.path("q.raw");
      const bf = fx.path("b.raw");
      const q = await qemu(["create", "-f", "raw", qf, size]);
      const b = await blk(["create", "-f", "raw", bf, size]);
      expect(b.code).toBe(q.code);
      expect(b.stdout).toBe(q.stdout.replaceAll(qf, bf));
      expect(b.stderr).toBe(q.stderr.replaceAll(qf, bf).replaceAll("qemu-img", "blk-img"));
      if (q.code === 0) expect(statSync(bf).size).toBe(statSync(qf).size);
    });

    it.each([["off"], ["falloc"], ["full"]])(
      "preallocation=%s: same Formatting line and info",
      async (mode) => {
        const qf = fx.path("q.raw");
        const bf = fx.path("b.raw");
        const q = await qemu(["create", "-f", "raw", "-o", `preallocation=${mode}`, qf, "1537k"]);
        const b = await blk(["create", "-f", "raw", "-o", `preallocation=${mode}`, bf, "1537k"]);
        expect(b.code).toBe(0);
        expect(b.stdout).toBe(q.stdout.replaceAll(qf, bf));
        const qi = JSON.parse((await qemu(["info", "--output=json", qf])).stdout) as Record<string, unknown>;
        const bi = JSON.parse((await blk(["info", "--output=json", bf])).stdout) as Record<string, unknown>;
        expect(bi).toEqual({ ...qi, filename: bf });
      },
    );

    it.each([
      [["-f", "raw"]],
      [["-f", "qcow3", "@", "1M"]],
      [["-o", "foo=bar", "@", "1M"]],
      [["-o", "preallocation=bogus", "@", "1M"]],
      [["-o", "preallocation=metadata", "@", "1M"]],
      [["-o", "size=2M", "@", "1M"]],
      [["-o", "size=2M,nocow=on,extent_size_hint=1M", "@"]],
      [["-b", "base.raw", "-F", "raw", "@", "1M"]],
      [["-q", "@", "1M"]],
      [["@", "1M", "extra"]],
      [[]],
      [["--bogus", "@"]],
    ])("%j: same output and exit code", async (args) => {
      const qf = fx.path("q.raw");
      const bf = fx.path("b.raw");
      const sub = (f: string) => (args.includes("@") ? args.map((a) => (a === "@" ? f : a)) : [...args, f]);
      const q = await qemu(["create", ...(args.length === 0 ? [] : sub(qf))]);
      const b = await blk(["create", ...(args.length === 0 ? [] : sub(bf))]);
      expect(b.code).toBe(q.code);
      expect(b.stdout).toBe(q.stdout.replaceAll(qf, bf));
      expect(b.stderr).toBe(q.stderr.replaceAll(qf, bf).replaceAll("qemu-img", "blk-img"));
    });
  });

  describe("create -f qcow2 (through the registry's qcow2 driver)", () => {
    it.each([
      [["@", "64M"]],
      [["-o", "cluster_size=4k,compat=0.10,refcount_bits=16", "@", "1000"]],
      [["-o", "lazy_refcounts=on,refcount_bits=8,compat=1.1", "@", "1G"]],
      [["-b", "BASE", "-F", "qcow2", "@"]],
      [["-b", "BASE", "-F", "qcow2", "-u", "@", "32M"]],
      [["-o", "backing_file=BASE,backing_fmt=qcow2", "@"]],
      [["-b", "BASE", "@"]],
      [["-b", "nonexistent.qcow2", "-F", "qcow2", "@"]],
      [["-b", "BASE", "-u", "@", "1M"]],
      [["-o", "bogus=1", "@", "1M"]],
    ])(
      "%j: same line, messages, exit code; the image passes qemu-img check with the same info",
      async (args) => {
        const base = fx.path("base.qcow2");
        await qemu(["create", "-q", "-f", "qcow2", base, "64M"]);
        const baseName = base.slice(base.lastIndexOf("/") + 1);
        const qf = fx.path("q.qcow2");
        const bf = fx.path("b.qcow2");
        const sub = (f: string) =>
          args.map((a) => (a === "@" ? f : a.replaceAll("BASE", baseName))).map((a) => a);
        const q = await qemu(["create", "-f", "qcow2", ...sub(qf)]);
        const b = await blk(["create", "-f", "qcow2", ...sub(bf)]);
        expect(b.code).toBe(q.code);
        expect(b.stdout).toBe(q.stdout.replaceAll(qf, bf));
        expect(b.stderr).toBe(q.stderr.replaceAll(qf, bf).replaceAll("qemu-img", "blk-img"));
        if (q.code !== 0) return;
        expect((await qemu(["check", bf])).code).toBe(0);
        const info = async (f: string) => {
          const o = JSON.parse((await qemu(["info", "-U", "--output=json", f])).stdout) as Record<
            string,
            unknown
          >;
          delete o.filename;
          delete o["actual-size"];
          if (typeof o["full-backing-filename"] === "string") o["full-backing-filename"] = "";
          return o;
        };
        expect(await info(bf)).toEqual(await info(qf));
      },
    );
  });

  describe("info", () => {
    it("JSON and human text match on sparse, dense, odd-sized and empty images", async () => {
      const odd = fx.path("odd.raw");
      writeFileSync(odd, new Uint8Array(1000).fill(7));
      const empty = fx.path("empty.raw");
      writeFileSync(empty, "");
      for (const f of [await fx.sparse(), fx.dense(), fx.zeroes(), odd, empty]) {
        for (const args of [
          ["info", "--output=json", f],
          ["info", "-f", "raw", "--output", "json", "-U", f],
          ["info", "--backing-chain", "--output=json", f],
        ]) {
          const { q, b } = await both(args);
          expect(b.code).toBe(0);
          expect(JSON.parse(b.stdout)).toEqual(JSON.parse(q.stdout));
        }
        const { q, b } = await both(["info", f]);
        expect(b.stdout).toBe(q.stdout);
        expect((await both(["info", "--backing-chain", f])).b.stdout).toBe(q.stdout);
      }
    });

    it.each([
      [["info", "/nonexistent/x.raw"]],
      [["info", "--output=xml", "@"]],
      [["info"]],
      [["info", "@", "@"]],
      [["info", "-x", "@"]],
      [["info", "-f"]],
      [["info", "--image-opts", "-f", "raw", "@"]],
    ])("errors %j: same message and exit code", async (args) => {
      const f = fx.dense(3, 4096);
      const { q, b } = await both(args.map((a) => (a === "@" ? f : a)));
      expect(b.code).toBe(q.code);
      expect(b.stderr).toBe(q.stderr);
      expect(b.stdout).toBe(q.stdout);
    });

    it("--image-opts opens a blockdev option string", async () => {
      const f = fx.dense(4, 8192);
      const { q, b } = await both(["info", "--output=json", "--image-opts", `driver=raw,file.filename=${f}`]);
      expect(b.code).toBe(q.code);
      const strip = (s: string) => {
        const o = JSON.parse(s) as Record<string, unknown>;
        delete o.filename;
        return o;
      };
      expect(strip(b.stdout)).toEqual(strip(q.stdout));
    });

    it.each([
      ["driver=null-co,size=2G"],
      ["driver=null-co,size=1.5M"],
      ["driver=null-co,size=0x100000"],
      ["driver=raw,offset=4k,size=4k,file.filename=@"],
      ["driver=raw,offset=2Q,file.filename=@"],
    ])("--image-opts %s: sizes with suffixes as QEMU's legacy open takes them", async (opts) => {
      const text = opts.replace("@", fx.dense(5, 65536));
      const { q, b } = await both(["info", "--output=json", "--image-opts", text]);
      // The program name, also in the fixture directory's name.
      const norm = (t: string) => t.replaceAll("qemu-img", "blk-img");
      expect({ code: b.code, stderr: norm(b.stderr) }).toEqual({ code: q.code, stderr: norm(q.stderr) });
      if (q.code === 0) {
        const o = JSON.parse(b.stdout) as { "virtual-size": number };
        expect(o["virtual-size"]).toBe((JSON.parse(q.stdout) as { "virtual-size": number })["virtual-size"]);
      }
    });

    it.each([["2Q"], ["-1"]])("--image-opts driver=null-co,size=%s: a one-line error", async (size) => {
      // qemu-img 7.2 aborts here ("Unexpected error in parse_option_size()", SIGABRT): blk-img says why.
      const opts = `driver=null-co,size=${size}`;
      const b = await blk(["info", "--image-opts", opts]);
      expect(b).toMatchObject({
        code: 1,
        stderr: `blk-img: Could not open '${opts}': Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n`,
      });
    });
  });

  describe("map", () => {
    it("JSON text and human text match, with and without a window", async () => {
      const empty = fx.path("empty.raw");
      writeFileSync(empty, "");
      const holes = fx.path("holes.raw");
      await qemu(["create", "-q", "-f", "raw", holes, "2M"]);
      await qemuIo(holes, "write -P 0x33 0 512", "write -P 0x44 1536k 512");
      for (const f of [await fx.sparse(), fx.dense(), fx.zeroes(), empty, holes]) {
        for (const extra of [
          [],
          ["--start-offset=70k", "--max-length=1M"],
          ["--start-offset", "5M"],
          ["--max-length=100"],
          ["-f", "raw", "-U"],
        ]) {
          for (const out of ["--output=json", "--output=human"]) {
            const { q, b } = await both(["map", out, ...extra, f]);
            expect(b.code).toBe(q.code);
            expect(b.stdout).toBe(q.stdout);
          }
        }
      }
    });

    it.each([
      [["map", "--max-length=abc", "@"]],
      [["map", "--start-offset=-1", "@"]],
      [["map", "@", "extra"]],
      [["map", "--output=svg2", "@"]],
      [["map", "/nonexistent.raw"]],
    ])("errors %j: same message and exit code", async (args) => {
      const f = fx.dense(5, 4096);
      const { q, b } = await both(args.map((a) => (a === "@" ? f : a)));
      expect(b.code).toBe(q.code);
      expect(b.stderr).toBe(q.stderr);
    });
  });

  describe("compare", () => {
    it("exit codes and messages match over a matrix of images", async () => {
      const sparse = await fx.sparse();
      const sparse2 = await fx.sparse();
      const blank4 = fx.path("blank4.raw");
      await qemu(["create", "-q", "-f", "raw", blank4, "4M"]);
      const blank8 = fx.path("blank8.raw");
      await qemu(["create", "-q", "-f", "raw", blank8, "8M"]);
      const tail8 = fx.path("tail8.raw");
      await qemu(["create", "-q", "-f", "raw", tail8, "8M"]);
      await qemuIo(tail8, "write -P 1 5M 512");
      const zeroes4 = fx.zeroes(4 << 20);
      const dense = fx.dense(7, 4 << 20);
      const dense2 = fx.dense(7, 4 << 20);
      const denseDiff = fx.dense(7, 4 << 20);
      await qemuIo(denseDiff, "write -P 9 3000000 100");
      const files = [sparse, sparse2, blank4, blank8, tail8, zeroes4, dense, dense2, denseDiff];
      const pairs: [string, string][] = [];
      for (const a of files) for (const b of files) if (a !== b) pairs.push([a, b]);
      for (const [a, b] of pairs) {
        for (const flags of [[], ["-s"], ["-q", "-f", "raw", "-F", "raw"]]) {
          const r = await both(["compare", ...flags, a, b]);
          expect({ args: [flags, a, b], code: r.b.code, out: r.b.stdout }).toEqual({
            args: [flags, a, b],
            code: r.q.code,
            out: r.q.stdout,
          });
        }
      }
    });

    it("-p: same (P/100%) framing as qemu-img around the same messages", async () => {
      const s4 = fx.path("s4.raw");
      await qemu(["create", "-q", "-f", "raw", s4, "4M"]);
      const s8 = fx.path("s8.raw");
      await qemu(["create", "-q", "-f", "raw", s8, "8M"]);
      const sparse = await fx.sparse();
      // Intermediate percentages depend on request sizes; the first update and the end are fixed.
      const frame = (out: string): [string, string] => {
        const parts = out.split("\r");
        return [parts[0] ?? "", parts.at(-1) ?? ""];
      };
      for (const args of [
        ["-s", s4, s8],
        [s4, sparse],
        [s4, s8],
        [s4, s4],
      ]) {
        const { q, b } = await both(["compare", "-p", ...args]);
        expect(b.code).toBe(q.code);
        expect(frame(b.stdout)).toEqual(frame(q.stdout));
      }
    });

    it.each([
      [["compare", "@", "/nonexistent.raw"]],
      [["compare", "@"]],
      [["compare", "-T", "bogus", "@", "@"]],
    ])("errors %j: same message and exit code", async (args) => {
      const f = fx.dense(8, 4096);
      const { q, b } = await both(args.map((a) => (a === "@" ? f : a)));
      expect(b.code).toBe(q.code);
      expect(b.stderr).toBe(q.stderr);
    });
  });

  describe("convert", () => {
    const mapOf = async (tool: "q" | "b", f: string): Promise<string> =>
      tool === "q"
        ? (await qemu(["map", "--output=json", f])).stdout
        : (await blk(["map", "--output=json", f])).stdout;
    const infoOf = async (f: string): Promise<Record<string, unknown>> => {
      const o = JSON.parse((await qemu(["info", "--output=json", f])).stdout) as Record<string, unknown>;
      delete o.filename;
      return o;
    };

    it.each([
      [[]],
      [["-S", "0"]],
      [["-S", "64k"]],
      [["-O", "raw", "-o", "preallocation=full"]],
      [["-m", "1", "-W", "-t", "none", "-T", "writeback"]],
    ])("%j: same content, sparseness (map) and info as qemu-img's result", async (flags) => {
      const sources = [await fx.sparse(), fx.dense(2), fx.zeroes()];
      for (const src of sources) {
        const qo = fx.path("q.raw");
        const bo = fx.path("b.raw");
        const q = await qemu(["convert", ...flags, src, qo]);
        const b = await blk(["convert", ...flags, src, bo]);
        expect(b).toEqual({ code: q.code, stdout: q.stdout, stderr: q.stderr });
        expect(await mapOf("b", bo)).toBe(await mapOf("q", qo));
        expect(await infoOf(bo)).toEqual(await infoOf(qo));
        expect((await qemu(["compare", "-f", "raw", "-F", "raw", src, bo])).code).toBe(0);
      }
    });

    it("-S: zero runs inside data are left unwritten exactly as qemu-img leaves them", async () => {
      // Dense data with zero runs of 512 B, 4 KiB, 8 KiB, 60 KiB, 64 KiB and 128 KiB, all allocated.
      const runs = [512, 4096, 8192, 61440, 65536, 131072];
      const parts: Uint8Array[] = [];
      let pos = 0;
      for (const r of runs) {
        const d = new Uint8Array(12288).fill(0x5a);
        parts.push(d, new Uint8Array(r));
        pos += d.length + r;
      }
      const tail = new Uint8Array((Math.ceil(pos / 65536) + 1) * 65536 - pos).fill(0x6b);
      parts.push(tail);
      const src = fx.path("runs.raw");
      writeFileSync(src, Buffer.concat(parts));
      for (const flags of [[], ["-S", "512"], ["-S", "8k"], ["-S", "64k"], ["-S", "0"]]) {
        const qo = fx.path("q.raw");
        const bo = fx.path("b.raw");
        expect((await qemu(["convert", "-f", "raw", ...flags, src, qo])).code).toBe(0);
        expect((await blk(["convert", "-f", "raw", ...flags, src, bo])).code).toBe(0);
        expect({ flags, map: await mapOf("b", bo) }).toEqual({ flags, map: await mapOf("q", qo) });
      }
    });

    it("-S on random layouts of data and zero runs (dense and sparse sources)", async () => {
      let seed = 12345;
      const rnd = (n: number): number => {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        return (seed >>> 8) % n;
      };
      for (let layout = 0; layout < 3; layout++) {
        const sizes = [512, 1024, 3584, 4096, 8192, 12288, 65536, 200704];
        const parts: Uint8Array[] = [];
        for (let i = 0; i < 40; i++) {
          const len = sizes[rnd(sizes.length)] ?? 512;
          parts.push(i % 2 === 0 ? new Uint8Array(len).fill(1 + rnd(255)) : new Uint8Array(len));
        }
        const dense = fx.path("rand.raw");
        writeFileSync(dense, Buffer.concat(parts));
        const sparse = fx.path("rand-sparse.raw");
        await qemu(["convert", "-f", "raw", "-O", "raw", dense, sparse]);
        for (const src of [dense, sparse]) {
          for (const flags of [[], ["-S", "1k"], ["-S", "3k"], ["-S", "12k"], ["-S", "64k"], ["-S", "1M"]]) {
            const qo = fx.path("q.raw");
            const bo = fx.path("b.raw");
            expect((await qemu(["convert", "-f", "raw", ...flags, src, qo])).code).toBe(0);
            expect((await blk(["convert", "-f", "raw", ...flags, src, bo])).code).toBe(0);
            expect({ layout, src, flags, map: await mapOf("b", bo) }).toEqual({
              layout,
              src,
              flags,
              map: await mapOf("q", qo),
            });
          }
        }
      }
    });

    it("concatenates several sources", async () => {
      const srcs = [await fx.sparse(), fx.dense(3, 100_000), fx.zeroes(65536)];
      const qo = fx.path("q.raw");
      const bo = fx.path("b.raw");
      expect((await qemu(["convert", ...srcs, qo])).code).toBe(0);
      expect((await blk(["convert", ...srcs, bo])).code).toBe(0);
      expect(await mapOf("b", bo)).toBe(await mapOf("q", qo));
      expect((await qemu(["compare", "-s", "-f", "raw", "-F", "raw", qo, bo])).code).toBe(0);
    });

    it("-n writes into an existing image (and zeroes what the source has as zeroes)", async () => {
      const src = await fx.sparse();
      const qo = fx.dense(11, 4 << 20);
      const bo = fx.dense(11, 4 << 20);
      const q = await qemu(["convert", "-n", "-f", "raw", "-O", "raw", src, qo]);
      const b = await blk(["convert", "-n", "-f", "raw", "-O", "raw", src, bo]);
      expect(b.code).toBe(q.code);
      expect((await qemu(["compare", "-f", "raw", "-F", "raw", src, bo])).code).toBe(0);
      expect((await qemu(["compare", "-f", "raw", "-F", "raw", qo, bo])).code).toBe(0);
    });

    it("-n --target-is-zero leaves zero ranges unwritten, like qemu-img", async () => {
      const src = await fx.sparse();
      const out: string[] = [];
      for (const tool of ["q", "b"] as const) {
        const o = fx.path(`${tool}.raw`);
        await qemu(["create", "-q", "-f", "raw", o, "4M"]);
        const argv = ["convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", src, o];
        expect((tool === "q" ? await qemu(argv) : await blk(argv)).code).toBe(0);
        out.push(await mapOf(tool, o));
      }
      expect(out[1]).toBe(out[0]);
    });

    it("-p without a terminal prints qemu-img's (P/100%) updates", async () => {
      const src = fx.dense(12, 4 << 20);
      const b = await blk(["convert", "-p", src, fx.path("p.raw")]);
      expect(b.code).toBe(0);
      expect(b.stdout.startsWith("    (0.00/100%)\r")).toBe(true);
      expect(b.stdout.endsWith("    (100.00/100%)\r\n")).toBe(true);
      expect(
        b.stdout
          .split("\r")
          .slice(0, -1)
          .every((s) => /^ {4}\(\d+\.\d\d\/100%\)$/.test(s)),
      ).toBe(true);
      const quiet = await blk(["convert", "-p", "-q", src, fx.path("p.raw")]);
      expect(quiet.stdout).toBe("");
    });

    it.each([
      [["convert", "-S", "3k", "@", "#"]],
      [["convert", "-S", "100", "@", "#"]],
      [["convert", "-S", "abc", "@", "#"]],
      [["convert", "-c", "-O", "raw", "@", "#"]],
      [["convert", "-m", "17", "@", "#"]],
      [["convert", "@"]],
      [["convert", "-n", "@", "/nonexistent/x.raw"]],
      [["convert", "--target-is-zero", "@", "#"]],
      [["convert", "-O", "qcow3", "@", "#"]],
      [["convert", "/nonexistent.raw", "#"]],
      [["convert", "-t", "bogus", "@", "#"]],
      [["convert", "-r", "abc", "@", "#"]],
      [["convert", "-B", "x", "-O", "raw", "@", "#"]],
      [["convert", "-n", "-o", "preallocation=full", "@", "#"]],
      [["convert", "--image-opts", "-f", "raw", "@", "#"]],
      [["convert", "-O", "raw", "-o", "bogus=1", "@", "#"]],
      [["convert", "-O", "raw", "@", "/nonexistent/x.raw"]],
      [["convert", "-n", "@", "small"]],
    ])("errors %j: same message and exit code", async (args) => {
      const f = fx.dense(13, 2 << 20);
      const qo = fx.path("q.raw");
      const bo = fx.path("b.raw");
      if (args.includes("small")) {
        writeFileSync(qo, new Uint8Array(4096));
        writeFileSync(bo, new Uint8Array(4096));
      }
      const sub = (o: string) => args.map((a) => (a === "@" ? f : a === "#" || a === "small" ? o : a));
      const q = await qemu(sub(qo));
      const b = await blk(sub(bo));
      expect(b.code).toBe(q.code);
      expect(b.stderr).toBe(q.stderr.replaceAll(qo, bo).replaceAll("qemu-img", "blk-img"));
    });
  });

  describe("resize", () => {
    it.each([
      [["+1M"]],
      [["8M"]],
      [["+1000"]],
      [["1M"]],
      [["--shrink", "@", "--", "-1M"]],
      [["--shrink", "@", "1M"]],
      [["@", "--", "-100M"]],
      [["--shrink", "@", "0"]],
      [["@", "abc"]],
      [["@"]],
      [["@", "1M", "--shrink"]],
      [["--preallocation=bad", "@", "8M"]],
      [["--preallocation=falloc", "@", "8M"]],
      [["--preallocation=full", "@", "5M"]],
      [["--shrink", "--preallocation=full", "@", "1M"]],
      [["-q", "@", "6M"]],
      [["@", "0x500000"]],
    ])("%j on a sparse raw: same messages, exit code and resulting file", async (args) => {
      const qf = await fx.sparse();
      const bf = await fx.sparse();
      const sub = (f: string) => (args.includes("@") ? args.map((a) => (a === "@" ? f : a)) : [f, ...args]);
      for (const fmt of [["-f", "raw"], []]) {
        const q = await qemu(["resize", ...fmt, ...sub(qf)]);
        const b = await blk(["resize", ...fmt, ...sub(bf)]);
        expect(b.code).toBe(q.code);
        expect(b.stdout).toBe(q.stdout);
        expect(b.stderr).toBe(q.stderr.replaceAll(qf, bf).replaceAll("qemu-img", "blk-img"));
        expect(statSync(bf).size).toBe(statSync(qf).size);
        expect(await mapOf(bf)).toBe(await mapOf(qf));
      }
    });
    const mapOf = async (f: string) => (await qemu(["map", "-f", "raw", "--output=json", f])).stdout;
  });

  describe("check", () => {
    it("raw: This image format does not support checks, exit 63 (human and JSON)", async () => {
      const f = await fx.sparse();
      for (const args of [
        ["check", f],
        ["check", "--output=json", "-f", "raw", f],
        ["check", "-q", f],
      ]) {
        const { q, b } = await both(args);
        expect(b).toEqual(q);
      }
    });
    it.each([
      [["check", "-r", "bad", "@"]],
      [["check", "/nonexistent.raw"]],
      [["check", "--output=x", "@"]],
      [["check"]],
    ])("errors %j: same message and exit code", async (args) => {
      const f = fx.dense(14, 4096);
      const { q, b } = await both(args.map((a) => (a === "@" ? f : a)));
      expect(b).toEqual(q);
    });
  });

  describe.skipIf(getDriver("qcow2") === undefined)(
    "qcow2 images (read through the registry's qcow2 driver)",
    () => {
      /** qemu-img.md §0's fixtures: base, an overlay with own data and zero clusters, one with snapshots. */
      const chain = async (): Promise<{ base: string; top: string; snap: string }> => {
        const d = fx.path("chain");
        mkdirSync(d);
        const base = `${d}/base.qcow2`;
        const top = `${d}/top.qcow2`;
        const snap = `${d}/snap.qcow2`;
        await qemu(["create", "-q", "-f", "qcow2", base, "64M"]);
        await run("qemu-io", [
          "-f",
          "qcow2",
          "-c",
          "write -P 0x11 0 192k",
          "-c",
          "write -P 0x22 1M 64k",
          base,
        ]);
        await qemu(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]);
        const io = ["-c", "write -P 0x33 64k 64k", "-c", "write -z 1M 64k", "-c", "write -z 2M 128k"];
        await run("qemu-io", ["-f", "qcow2", ...io, top]);
        await qemu(["create", "-q", "-f", "qcow2", snap, "16M"]);
        await qemu(["snapshot", "-c", "s1", snap]);
        return { base, top, snap };
      };

      it("info, map, compare and check give qemu-img's output", async () => {
        const { base, top, snap } = await chain();
        for (const argv of [
          ["info", top],
          ["info", "--backing-chain", top],
          ["info", snap],
          ["map", top],
          ["map", "--output=json", top],
          ["map", "--output=json", "--start-offset=64k", "--max-length=1M", top],
          ["compare", base, top],
          ["compare", "-s", top, top],
          ["check", top],
          ["check", "-q", base],
        ]) {
          const { q, b } = await both(argv);
          expect({ argv, ...b }).toEqual({ argv, ...q });
        }
        for (const argv of [
          ["info", "--output=json", top],
          ["info", "--backing-chain", "--output=json", top],
          ["check", "--output=json", top],
        ]) {
          const { q, b } = await both(argv);
          expect(b.code).toBe(q.code);
          expect(JSON.parse(b.stdout)).toEqual(JSON.parse(q.stdout));
        }
      });

      it("convert -O raw of an overlay gives qemu-img's content and sparseness", async () => {
        const { top } = await chain();
        const qo = fx.path("q.raw");
        const bo = fx.path("b.raw");
        expect((await qemu(["convert", "-O", "raw", top, qo])).code).toBe(0);
        expect((await blk(["convert", "-O", "raw", top, bo])).code).toBe(0);
        expect((await blk(["map", "--output=json", bo])).stdout).toBe(
          (await qemu(["map", "--output=json", qo])).stdout,
        );
        expect((await qemu(["compare", "-s", qo, bo])).code).toBe(0);
      });

      it("convert -O qcow2 writes an image qemu-img checks clean and reads as the source", async () => {
        const { top } = await chain();
        const bo = fx.path("b.qcow2");
        const r = await blk(["convert", "-O", "qcow2", top, bo]);
        expect(r).toMatchObject({ code: 0, stderr: "" });
        const check = await qemu(["check", "--output=json", bo]);
        expect(check.code).toBe(0);
        expect(JSON.parse(check.stdout)).toMatchObject({ "check-errors": 0 });
        expect(JSON.parse(check.stdout)).not.toHaveProperty("leaks");
        expect((await qemu(["compare", top, bo])).stdout).toBe("Images are identical.\n");
        // Sparseness: the zero ranges of the chain are not allocated as data in the target.
        const map = JSON.parse((await qemu(["map", "--output=json", bo])).stdout) as {
          data: boolean;
          length: number;
        }[];
        const data = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
        expect(data).toBeLessThanOrEqual(4 << 20);
      });
    },
  );

  describe("I/O errors (blkdebug through --image-opts)", () => {
    it("convert: error while reading at byte N (exit 1); compare: Error while reading offset N (exit 4)", async () => {
      const f = fx.dense(21, 3 << 20);
      const bad = `driver=raw,file.driver=blkdebug,file.image.filename=${f},file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,file.inject-error.0.sector=4096`;
      const qo = fx.path("q.raw");
      const bo = fx.path("b.raw");
      const q = await qemu(["convert", "--image-opts", bad, qo]);
      const b = await blk(["convert", "--image-opts", bad, bo]);
      expect(b).toEqual({ ...q, stderr: q.stderr.replaceAll("qemu-img", "blk-img") });
      const good = `driver=raw,file.filename=${f}`;
      const c = await both(["compare", "--image-opts", bad, good]);
      expect(c.b).toEqual(c.q);
    });
  });

  describe("command line", () => {
    it.each([[[]], [["foo"]], [["--bogus"]], [["info", "--bogus", "x"]]])("%j: same error", async (args) => {
      const { q, b } = await both(args);
      expect(b).toEqual(q);
    });
  });
});
