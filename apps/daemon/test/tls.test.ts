/**
 * `tls-creds-psk` / `tls-creds-x509` objects and `nbd-server-start tls-creds`, in process: validation
 * with QEMU 7.2's messages, qom-list/qom-get/qom-set, `--object` keyval spelling, and an NBD client over
 * TLS against the daemon's server (a plaintext one refused). Needs openssl for the certificates.
 */
import { join } from "node:path";
import { NbdClient, TlsCreds } from "@blk/drivers/nbd";
import { makeTempDir, missingPeers } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { makeTlsFixtures } from "../../../packages/drivers/test/nbd-tls-fixtures.ts";
import { generic, startSession } from "./helpers.ts";

const missing = missingPeers(["openssl"]);

describe.skipIf(missing.length > 0)("TLS credentials objects", { timeout: 60_000 }, () => {
  it("object-add validation, qom-*, nbd-server-start tls-creds, object-del", async () => {
    await using s = await startSession();
    const fx = await makeTlsFixtures(s.dir.path);
    const nowhere = join(s.dir.path, "nowhere");
    const bad: [Record<string, unknown>, string][] = [
      [{ "qom-type": "tls-creds-psk", id: "t" }, "Missing 'dir' property value"],
      [
        { "qom-type": "tls-creds-psk", id: "t", dir: nowhere, endpoint: "server" },
        `Unable to access credentials ${nowhere}/keys.psk: No such file or directory`,
      ],
      [
        { "qom-type": "tls-creds-x509", id: "t", dir: fx.x509Anonymous, endpoint: "server" },
        `Unable to access credentials ${fx.x509Anonymous}/server-cert.pem: No such file or directory`,
      ],
      [{ "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, bogus: 1 }, "Parameter 'bogus' is unexpected"],
      [
        { "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, endpoint: "sideways" },
        "Parameter 'endpoint' does not accept value 'sideways'",
      ],
      [
        { "qom-type": "tls-creds-psk", id: "t", dir: 5 },
        "Invalid parameter type for 'dir', expected: string",
      ],
      [
        { "qom-type": "tls-creds-x509", id: "t", dir: fx.x509Server, "verify-peer": 1 },
        "Invalid parameter type for 'verify-peer', expected: boolean",
      ],
      [
        { "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, username: "bob", loaded: true },
        "Property 'tls-creds-psk.loaded' is not writable",
      ],
    ];
    for (const [args, desc] of bad) expect(await s.error("object-add", args)).toEqual(generic(desc));

    await s.qmp.execute("object-add", {
      "qom-type": "tls-creds-psk",
      id: "psk0",
      endpoint: "server",
      dir: fx.psk,
    });
    await s.qmp.execute("object-add", { "qom-type": "tls-creds-psk", id: "pskc", dir: fx.psk });
    await s.qmp.execute("object-add", {
      "qom-type": "tls-creds-x509",
      id: "x0",
      endpoint: "server",
      dir: fx.x509Server,
      "verify-peer": false,
    });
    await s.qmp.execute("object-add", { "qom-type": "throttle-group", id: "tg0" });
    for (const id of ["psk0", "tg0"])
      expect(await s.error("object-add", { "qom-type": "tls-creds-psk", id, dir: fx.psk })).toEqual(
        generic(`attempt to add duplicate property '${id}' to object (type 'container')`),
      );
    expect(await s.error("object-add", { "qom-type": "throttle-group", id: "x0" })).toEqual(
      generic("attempt to add duplicate property 'x0' to object (type 'container')"),
    );
    expect(await s.qmp.execute("qom-list", { path: "/objects" })).toEqual([
      { name: "type", type: "string" },
      { name: "tg0", type: "child<throttle-group>" },
      { name: "psk0", type: "child<tls-creds-psk>" },
      { name: "pskc", type: "child<tls-creds-psk>" },
      { name: "x0", type: "child<tls-creds-x509>" },
    ]);
    expect(await s.qmp.execute("qom-list", { path: "/objects/psk0" })).toEqual([
      { name: "type", type: "string" },
      { name: "endpoint", type: "QCryptoTLSCredsEndpoint" },
      { name: "dir", type: "string" },
      { name: "verify-peer", type: "bool" },
      { name: "priority", type: "string" },
      { name: "username", type: "string" },
      { name: "loaded", type: "bool" },
    ]);
    const get = (path: string, property: string): Promise<unknown> =>
      s.qmp.execute("qom-get", { path, property });
    expect(await get("/objects/x0", "type")).toBe("tls-creds-x509");
    expect(await get("/objects/x0", "endpoint")).toBe("server");
    expect(await get("/objects/x0", "verify-peer")).toBe(false);
    expect(await get("/objects/x0", "dir")).toBe(fx.x509Server);
    expect(await get("/objects/psk0", "username")).toBe("");
    expect(await get("/objects/psk0", "loaded")).toBe(true);
    expect(await s.error("qom-get", { path: "/objects/psk0", property: "nope" })).toEqual(
      generic("Property 'tls-creds-psk.nope' not found"),
    );
    await s.qmp.execute("qom-set", { path: "/objects/pskc", property: "priority", value: "NORMAL" });
    expect(await get("/objects/pskc", "priority")).toBe("NORMAL");
    expect(await s.error("qom-set", { path: "/objects/pskc", property: "verify-peer", value: "x" })).toEqual(
      generic("Invalid parameter type for 'verify-peer', expected: boolean"),
    );

    const addr = { type: "unix", data: { path: join(s.dir.path, "nbd.sock") } };
    expect(await s.error("nbd-server-start", { addr, "tls-creds": "nope" })).toEqual(
      generic("No TLS credentials with id 'nope'"),
    );
    expect(await s.error("nbd-server-start", { addr, "tls-creds": "pskc" })).toEqual(
      generic("Expected TLS credentials for a server endpoint"),
    );
    await s.qmp.execute("blockdev-add", {
      driver: "null-co",
      "node-name": "n0",
      size: 1 << 20,
      "read-zeroes": true,
    });
    await s.qmp.execute("nbd-server-start", { addr, "tls-creds": "psk0" });
    await s.qmp.execute("block-export-add", { type: "nbd", id: "e0", "node-name": "n0" });
    const server = { type: "unix", path: addr.data.path } as const;
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    {
      await using c = await NbdClient.connect({ server, export: "n0", tls: { creds } });
      expect(c.tls).toBe(true);
      expect(c.size).toBe(1 << 20);
      expect((await c.read(0, 4096)).every((b) => b === 0)).toBe(true);
    }
    const plain = await NbdClient.connect({ server, export: "n0" }).catch((e: unknown) => e as Error);
    expect(plain).toBeInstanceOf(Error);
    expect((plain as Error).message).toContain("server reported: Option 0x8 not permitted before TLS");
    // As QEMU 7.2: credentials can be deleted while the server uses them; the server keeps working.
    await s.qmp.execute("object-del", { id: "psk0" });
    expect(await s.error("object-del", { id: "psk0" })).toEqual(generic("object 'psk0' not found"));
    {
      await using c = await NbdClient.connect({ server, export: "n0", tls: { creds } });
      expect(c.tls).toBe(true);
    }
    await s.qmp.execute("nbd-server-stop");
  });

  it("--object and --nbd-server tls-creds from the command line", async () => {
    await using dir = makeTempDir("blkd-tls");
    const fx = await makeTlsFixtures(dir.path);
    const nbd = dir.join("nbd.sock");
    await using s = await startSession({
      options: [
        ["object", `tls-creds-x509,id=x1,endpoint=server,dir=${fx.x509Server},verify-peer=off`],
        ["object", `tls-creds-psk,id=p1,endpoint=server,dir=${fx.psk}`],
        ["nbd-server", `addr.type=unix,addr.path=${nbd},tls-creds=p1`],
        ["blockdev", "driver=null-co,node-name=n0,size=65536"],
        ["export", "type=nbd,id=e0,node-name=n0"],
      ],
    });
    expect(await s.qmp.execute("qom-get", { path: "/objects/x1", property: "verify-peer" })).toBe(false);
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    await using c = await NbdClient.connect({
      server: { type: "unix", path: nbd },
      export: "n0",
      tls: { creds },
    });
    expect(c.size).toBe(65536);
  });
});
