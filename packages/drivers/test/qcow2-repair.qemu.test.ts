/**
 * qcow2 repair through the driver against qemu-img 7.2: images damaged at random (refcounts raised,
 * lowered or zeroed, L2 entries cleared, COPIED flags flipped) are repaired by `node.check({ repair })` and
 * by `qemu-img check -r` on a copy with the same counts and the same problem lines, and both end clean
 * (or with the same remaining problems); a lazy-refcounts image left dirty by a crash is repaired on a
 * read-write open, as QEMU does, and reads back its data.
 */
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { commandRunner, makeTempDir, missingPeers, pattern, rng, run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import type { Qcow2CheckResult } from "../src/qcow2/index.ts";
import { openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 repair tests: missing ${missing.join(", ")}`);

/** Randomly damaged images per mode (QCOW2_REPAIR_CASES raises it). */
const CASES = Number(process.env.QCOW2_REPAIR_CASES ?? 6);

const dir = makeTempDir("blk-q2r");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path, 120_000);

interface CheckJson {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
  "corruptions-fixed"?: number;
  "leaks-fixed"?: number;
  "image-end-offset"?: number;
}

async function qcheck(
  name: string,
  repair?: string,
): Promise<{ code: number; json: CheckJson; err: string }> {
  const args = ["check", "--output=json", ...(repair === undefined ? [] : ["-r", repair]), name];
  const r = await sh("qemu-img", args, [0, 1, 2, 3]);
  const json = r.out === "" ? {} : (JSON.parse(r.out) as CheckJson & { filename?: string });
  delete json.filename;
  return { code: r.code, json, err: r.err };
}

/** An image with data, zero clusters and an internal snapshot, written by qemu-io. */
async function source(name: string): Promise<void> {
  await sh("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", name, "4M"]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 96k", "-c", "write -P 0x12 1M 32k", name]);
  await sh("qemu-img", ["snapshot", "-c", "s1", name]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x13 16k 16k", "-c", "write -z 2M 8k", name]);
}

/** Damages the image (refcount block 0 and the active L2 table 0) as `r` decides; returns what it did. */
function damage(name: string, r: () => number): string[] {
  const b = readFileSync(dir.join(name));
  const cs = 4096;
  const rt = Number(b.readBigUInt64BE(48));
  const rb = Number(b.readBigUInt64BE(rt));
  const l1 = Number(b.readBigUInt64BE(40));
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  const used: number[] = [];
  for (let c = 0; c < b.length / cs; c++) if (b.readUInt16BE(rb + c * 2) !== 0) used.push(c);
  const did: string[] = [];
  const n = 1 + Math.floor(r() * 3);
  for (let i = 0; i < n; i++) {
    const kind = Math.floor(r() * 4);
    if (kind === 0 || kind === 1) {
      // raise (leak) or zero/lower (corruption) a used cluster's refcount, never the header's
      const c = used[1 + Math.floor(r() * (used.length - 1))] ?? 1;
      const v = b.readUInt16BE(rb + c * 2);
      const nv = kind === 0 ? v + 1 : Math.max(0, v - 1);
      b.writeUInt16BE(nv, rb + c * 2);
      did.push(`refcount ${c}: ${v} -> ${nv}`);
    } else if (kind === 2) {
      const j = Math.floor(r() * 24);
      b.writeBigUInt64BE(0n, l2 + j * 8);
      did.push(`L2[${j}] cleared`);
    } else {
      const j = Math.floor(r() * 24);
      const e = b.readBigUInt64BE(l2 + j * 8);
      if (e !== 0n) b.writeBigUInt64BE(e ^ (1n << 63n), l2 + j * 8);
      did.push(`L2[${j}] COPIED flipped`);
    }
  }
  writeFileSync(dir.join(name), b);
  return did;
}

describe.skipIf(missing.length > 0)("qcow2 repair vs qemu-img check -r", { tags: ["qemu"] }, () => {
  for (const mode of ["leaks", "all"] as const) {
    it(`-r ${mode} on randomly damaged images: same counts, same lines, same end state`, async () => {
      await source(`src-${mode}.qcow2`);
      for (let i = 0; i < CASES; i++) {
        const r = rng(i * 977 + (mode === "all" ? 5 : 1));
        const q = `q-${mode}-${i}.qcow2`;
        const b = `b-${mode}-${i}.qcow2`;
        copyFileSync(dir.join(`src-${mode}.qcow2`), dir.join(q));
        const did = damage(q, r);
        copyFileSync(dir.join(q), dir.join(b));
        const why = JSON.stringify(did);
        const qr = await qcheck(q, mode);
        let mine: Qcow2CheckResult | undefined;
        let failed: unknown;
        {
          await using img = await openQcow2(dir.join(b), {
            writable: true,
            noBacking: true,
            qcow2: { "x-blk-check": true },
          });
          try {
            mine = (await img.node.check({ repair: mode })) as Qcow2CheckResult;
          } catch (e) {
            failed = e;
          }
        }
        if (qr.code === 1) {
          // qemu-img: "Check failed" (a rebuild needed under -r leaks)
          expect(failed, why).toMatchObject({ code: "EIO" });
          expect(qr.err, why).toContain("ERROR need to rebuild refcount structures");
        } else {
          expect(failed, why).toBeUndefined();
          expect(mine?.leaksFixed ?? 0, why).toBe(qr.json["leaks-fixed"] ?? 0);
          expect(mine?.corruptionsFixed ?? 0, why).toBe(qr.json["corruptions-fixed"] ?? 0);
          const lines = (mine?.messages ?? []).join("\n");
          for (const line of qr.err.split("\n").filter((l) => l.startsWith("Repairing"))) {
            expect(lines, why).toContain(line);
          }
        }
        const [cq, cb] = [await qcheck(q), await qcheck(b)];
        expect(cb.json, why).toEqual(cq.json);
        expect(cb.code, why).toBe(cq.code);
        const same = await sh("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", q, b], [0, 1, 2]);
        expect(same.code, why).toBe(0);
      }
    });
  }

  it("a dirty lazy-refcounts image is repaired on a read-write open, as QEMU does", async () => {
    const name = "lazy.qcow2";
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", name, "8M"]);
    await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x21 0 64k", name]);
    await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 1M 256k", "-c", "abort", name], [134, 1, -1]);
    expect(readFileSync(dir.join(name))[79]).toBe(1);
    expect((await qcheck(name)).code).toBe(2);
    copyFileSync(dir.join(name), dir.join("lazy-q.qcow2"));
    // QEMU repairs on a read-write open (qemu-io opens read-write; `flush` writes nothing)
    await sh("qemu-io", ["-f", "qcow2", "-c", "flush", "lazy-q.qcow2"]);
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      expect(img.state.dirty).toBe(false);
      expect(Buffer.from(await img.root.read(1 << 20, 256 << 10)).equals(Buffer.alloc(256 << 10, 0x22))).toBe(
        true,
      );
      await img.root.write(2 << 20, pattern(3, 0, 64 << 10));
    }
    const after = await qcheck(name);
    expect(after.code).toBe(0);
    expect(readFileSync(dir.join(name))[79]).toBe(0);
    const io = await sh(
      "qemu-io",
      ["-f", "qcow2", "-c", "read -P 0x21 0 64k", "-c", "read -P 0x22 1M 256k", name],
      [0, 1],
    );
    expect(io.out).not.toContain("Pattern verification failed");
    expect((await qcheck("lazy-q.qcow2")).code).toBe(0);
  });

  it("metadata found inconsistent at run time: the image is marked corrupt, as QEMU does", async () => {
    for (const tool of ["qemu", "blk"] as const) {
      const name = `runtime-${tool}.qcow2`;
      await sh("qemu-img", ["create", "-q", "-f", "qcow2", name, "16M"]);
      await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x41 0 64k", name]);
      const b = readFileSync(dir.join(name));
      const l1 = Number(b.readBigUInt64BE(40));
      b.writeBigUInt64BE(b.readBigUInt64BE(l1) + 0x200n, l1); // L2 table offset unaligned
      writeFileSync(dir.join(name), b);
    }
    const q = await run(
      "qemu-io",
      ["-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "read 0 4k", "runtime-qemu.qcow2"],
      {
        cwd: dir.path,
      },
    );
    const line = q.stderr.split("\n").find((l) => l.startsWith("qcow2: Marking image as corrupt"));
    expect(line).toBeDefined();
    expect(q.stdout).toContain("read failed: No medium found");
    const events: { message: string; fatal: boolean }[] = [];
    {
      await using img = await openQcow2(dir.join("runtime-blk.qcow2"), { writable: true });
      img.state.onCorruption = (e) => events.push(e);
      const w = await img.root.write(0, new Uint8Array(4096)).catch((e: unknown) => e);
      expect(w).toMatchObject({ code: "EIO", message: line });
      await expect(img.root.read(0, 4096)).rejects.toMatchObject({
        code: "ENOMEDIUM",
        message: "No medium found",
      });
    }
    expect(events).toEqual([{ message: expect.stringContaining("L2 table offset") as unknown, fatal: true }]);
    const info = async (f: string) =>
      (
        JSON.parse((await sh("qemu-img", ["info", "--output=json", f])).out) as { "format-specific": unknown }
      )["format-specific"];
    expect(await info("runtime-blk.qcow2")).toEqual(await info("runtime-qemu.qcow2"));
    expect(JSON.stringify(await info("runtime-blk.qcow2"))).toContain('"corrupt":true');
    // Read-only: only the requests fail, with QEMU's non-fatal wording; nothing is marked.
    copyFileSync(dir.join("runtime-blk.qcow2"), dir.join("runtime-ro.qcow2"));
    const qr = await run("qemu-io", ["-r", "-f", "qcow2", "-c", "read 0 4k", "runtime-ro.qcow2"], {
      cwd: dir.path,
    });
    const roLine = qr.stderr.split("\n").find((l) => l.startsWith("qcow2: Image is corrupt"));
    {
      await using img = await openQcow2(dir.join("runtime-ro.qcow2"));
      await expect(img.root.read(0, 4096)).rejects.toMatchObject({ code: "EIO", message: roLine });
      // not fatal: the next request is served (and fails the same way), no "No medium found"
      await expect(img.root.read(1 << 20, 4096)).rejects.toMatchObject({ code: "EIO" });
    }
  });

  it("a dirty image opened read-only is repaired when reopened read-write", async () => {
    const name = "lazy-reopen.qcow2";
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", name, "8M"]);
    await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x31 0 128k", "-c", "abort", name], [134, 1, -1]);
    expect((await qcheck(name)).code).toBe(2);
    {
      await using img = await openQcow2(dir.join(name));
      expect(img.state.dirty).toBe(true);
      await img.node.children.get("file")?.child.reopen({ readOnly: false });
      await img.node.reopen({ readOnly: false });
      expect(img.state.dirty).toBe(false);
      await img.node.write(1 << 20, new Uint8Array(4096).fill(0x32));
    }
    expect((await qcheck(name)).code).toBe(0);
    const io = await sh(
      "qemu-io",
      ["-f", "qcow2", "-c", "read -P 0x31 0 128k", "-c", "read -P 0x32 1M 4k", name],
      [0, 1],
    );
    expect(io.out).not.toContain("Pattern verification failed");
  });
});
