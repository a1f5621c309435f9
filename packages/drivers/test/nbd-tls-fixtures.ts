/**
 * TLS credentials for tests, in QEMU's directory layout, made at test time: a PSK `keys.psk`, and an
 * openssl-made CA with a server certificate (`localhost`, 127.0.0.1) and a client certificate.
 */
import { randomBytes } from "node:crypto";
import { copyFile, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { run } from "@blk/testkit";

export interface TlsFixtures {
  /** `keys.psk` with `qemu:KEY` and `alice:KEY2`. */
  psk: string;
  /** Another `keys.psk` whose `qemu` key differs. */
  pskWrong: string;
  /** `ca-cert.pem`, `server-cert.pem`, `server-key.pem`. */
  x509Server: string;
  /** `ca-cert.pem`, `client-cert.pem`, `client-key.pem`. */
  x509Client: string;
  /** `ca-cert.pem` only (a client without a certificate). */
  x509Anonymous: string;
  /** A different CA with a client certificate it signed. */
  x509Stranger: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await run("openssl", args, { cwd, timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${r.stderr}`);
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(
    [
      "req",
      "-x509",
      ...EC,
      "-keyout",
      "ca-key.pem",
      "-out",
      "ca-cert.pem",
      "-days",
      "2",
      "-subj",
      `/CN=${name}`,
    ],
    dir,
  );
}

async function makeCert(caDir: string, out: string, role: "server" | "client"): Promise<void> {
  await mkdir(out, { recursive: true });
  const ext = join(caDir, `${role}.ext`);
  await writeFile(
    ext,
    [
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "basicConstraints=CA:FALSE",
      "keyUsage=digitalSignature,keyEncipherment",
      `extendedKeyUsage=${role === "server" ? "serverAuth" : "clientAuth"}`,
      "",
    ].join("\n"),
  );
  const csr = join(caDir, `${role}.csr`);
  await openssl(
    ["req", ...EC, "-keyout", join(out, `${role}-key.pem`), "-out", csr, "-subj", "/CN=localhost"],
    caDir,
  );
  await openssl(
    [
      "x509",
      "-req",
      "-in",
      csr,
      "-CA",
      "ca-cert.pem",
      "-CAkey",
      "ca-key.pem",
      "-CAcreateserial",
      "-out",
      join(out, `${role}-cert.pem`),
      "-days",
      "2",
      "-extfile",
      ext,
    ],
    caDir,
  );
  await copyFile(join(caDir, "ca-cert.pem"), join(out, "ca-cert.pem"));
}

/** Writes every fixture under `root` (about a second of openssl). */
export async function makeTlsFixtures(root: string): Promise<TlsFixtures> {
  const d = (n: string): string => join(root, n);
  const f: TlsFixtures = {
    psk: d("psk"),
    pskWrong: d("psk-wrong"),
    x509Server: d("x509-server"),
    x509Client: d("x509-client"),
    x509Anonymous: d("x509-anon"),
    x509Stranger: d("x509-stranger"),
  };
  for (const dir of [f.psk, f.pskWrong, f.x509Anonymous, d("ca"), d("ca2")])
    await mkdir(dir, { recursive: true });
  const hex = (): string => randomBytes(32).toString("hex");
  await writeFile(join(f.psk, "keys.psk"), `qemu:${hex()}\nalice:${hex()}\n`);
  await writeFile(join(f.pskWrong, "keys.psk"), `qemu:${hex()}\n`);
  await makeCa(d("ca"), "blk test CA");
  await makeCert(d("ca"), f.x509Server, "server");
  await makeCert(d("ca"), f.x509Client, "client");
  await copyFile(join(d("ca"), "ca-cert.pem"), join(f.x509Anonymous, "ca-cert.pem"));
  await makeCa(d("ca2"), "stranger CA");
  await makeCert(d("ca2"), f.x509Stranger, "client");
  // Trusts the real CA (so it accepts the server) but presents a certificate the server does not trust.
  await copyFile(join(d("ca"), "ca-cert.pem"), join(f.x509Stranger, "ca-cert.pem"));
  return f;
}
