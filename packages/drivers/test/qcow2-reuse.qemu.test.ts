/**
 * Reuse after discard, against a model: clusters freed by discard (and by zero writes with unmap) are
 * allocated again for other guest clusters — by whole-cluster writes, by partial writes that copy the rest
 * of the cluster from the backing file or zeroes, by concurrent requests on other clusters — and no read
 * ever shows another cluster's old data. Every write's bytes depend on their guest position and the
 * request, so data landing in, or left over from, the wrong cluster is seen. After each batch the image
 * reads as the model through blk; every few batches `qemu-img check` is clean (no leaks either) and
 * qemu-io / `qemu-img compare` read the model too. The file stays small: freed clusters are really reused.
 */
import { writeFileSync } from "node:fs";
import { commandRunner, makeTempDir, missingPeers, pattern, rng } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { type CreateQcow2Options, createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 reuse tests: missing ${missing.join(", ")}`);

/** Batches per image (QCOW2_REUSE_BATCHES raises it). */
const BATCHES = Number(process.env.QCOW2_REUSE_BATCHES ?? 25);
const SIZE = 1 << 20;

const dir = makeTempDir("blk-q2reuse");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path);

const cases: [string, Omit<CreateQcow2Options, "filename" | "size">][] = [
  ["v3, 4 KiB clusters", { clusterSize: 4096 }],
  [
    "v3, 4 KiB clusters, over a backing file",
    { clusterSize: 4096, backingFile: "base.raw", backingFormat: "raw" },
  ],
  [
    "v2, 4 KiB clusters, over a backing file",
    { clusterSize: 4096, compat: "0.10", backingFile: "base.raw", backingFormat: "raw" },
  ],
  ["v3, 512-byte clusters, refcount_bits=1", { clusterSize: 512, refcountBits: 1 }],
];

describe.skipIf(missing.length > 0)("qcow2 cluster reuse after discard", { tags: ["qemu"] }, () => {
  const base = pattern(0xba5e, 0, SIZE);
  writeFileSync(dir.join("base.raw"), base);

  it.each(cases)("%s: no read shows another cluster's old data", async (label, o) => {
    const name = `${label.replace(/[^a-z0-9]+/gi, "-")}.qcow2`;
    await createQcow2({ ...o, filename: dir.join(name), size: SIZE });
    const cs = o.clusterSize ?? 65536;
    const v3 = o.compat !== "0.10";
    const below = o.backingFile === undefined ? new Uint8Array(SIZE) : base;
    const model = below.slice();
    const r = rng(cs + (v3 ? 1 : 2) + (o.backingFile === undefined ? 0 : 4));
    let id = 0;
    await using img = await openQcow2(dir.join(name), { writable: true, discard: "unmap" });
    const clusters = SIZE / cs;
    for (let batch = 0; batch < BATCHES; batch++) {
      // A batch: requests on distinct clusters run concurrently (their order does not matter).
      const taken = new Set<number>();
      const reqs: Promise<void>[] = [];
      const n = 1 + Math.floor(r() * 6);
      for (let k = 0; k < n; k++) {
        const first = Math.floor(r() * clusters);
        const count = Math.min(clusters - first, 1 + Math.floor(r() * 3));
        let free = true;
        for (let c = first; c < first + count; c++) if (taken.has(c)) free = false;
        if (!free) continue;
        for (let c = first; c < first + count; c++) taken.add(c);
        const start = first * cs;
        const span = count * cs;
        const kind = r();
        if (kind < 0.35) {
          // discard: whole clusters read as zeroes (v3) or as what lies below (v2)
          reqs.push(img.root.discard(start, span));
          model.set(v3 ? new Uint8Array(span) : below.subarray(start, start + span), start);
        } else if (kind < 0.45) {
          reqs.push(img.root.writeZeroes(start, span, { mayUnmap: true }));
          model.fill(0, start, start + span);
        } else {
          // a write: whole clusters, or a part of one (the rest copied from below or kept)
          const whole = kind < 0.7;
          const off = whole ? start : start + Math.floor(r() * (span / 512)) * 512;
          const len = whole ? span : Math.max(512, Math.floor(r() * ((start + span - off) / 512)) * 512);
          const data = pattern(++id * 7 + 3, off, len);
          reqs.push(img.root.write(off, data));
          model.set(data, off);
        }
      }
      await Promise.all(reqs);
      const got = await img.root.read(0, SIZE);
      const bad = Buffer.from(got).equals(model) ? -1 : got.findIndex((b, i) => b !== model[i]);
      expect(bad, `${label}, batch ${batch}: byte ${bad}`).toBe(-1);
      if (batch % 10 === 9 || batch === BATCHES - 1) {
        await img.root.flush();
        const c = await sh("qemu-img", ["check", "-U", "--output=json", name], [0, 2, 3]);
        const json = JSON.parse(c.out) as { corruptions?: number; leaks?: number };
        expect(json.corruptions ?? 0, `${label}, batch ${batch}`).toBe(0);
        expect(json.leaks ?? 0, `${label}, batch ${batch}`).toBe(0);
        writeFileSync(dir.join(`${name}.model`), model);
        const cmp = await sh(
          "qemu-img",
          ["compare", "-U", "-f", "qcow2", "-F", "raw", name, `${name}.model`],
          [0, 1],
        );
        expect(cmp.out, `${label}, batch ${batch}`).toBe("Images are identical.\n");
        // qemu-io spot check: a cluster's first sector
        const c0 = Math.floor(r() * clusters) * cs;
        const sector = model.subarray(c0, c0 + 512);
        if (sector.every((b) => b === sector[0])) {
          const io = await sh(
            "qemu-io",
            ["-r", "-U", "-f", "qcow2", "-c", `read -P ${sector[0]} ${c0} 512`, name],
            [0, 1],
          );
          expect(io.out).not.toContain("Pattern verification failed");
        }
      }
    }
    // Freed clusters were reused: the file holds little more than the guest size plus metadata.
    expect(img.node.children.get("file")?.child.length ?? 0).toBeLessThan(SIZE * 1.5 + 64 * cs);
  });
});
