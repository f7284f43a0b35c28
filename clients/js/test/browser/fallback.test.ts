// Transport fallback in a real Chromium: WebSocket blocked (a proxy that breaks it) → SSE;
// SSE blocked too → long-poll; unblocked → back up to WebSocket. Every message arrives once.
import type { Page } from 'playwright-core';
import { describe, expect, it } from 'vitest';
import { gotIds, NetworkCut, pageClient, recorded, sleep, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser();

const onTransport = async (page: Page, transport: string, timeoutMs = 30_000) =>
  until(
    `connected over ${transport}`,
    async () => {
      const r = await recorded(page);
      return r.state === 'connected' && r.transport === transport;
    },
    timeoutMs,
  );

describe('transport fallback', () => {
  it('falls back from a blocked WebSocket to SSE, then to long-poll, and upgrades back', async () => {
    const user = 'fallback';
    const room = 'room-fallback';
    await env.server.inner('create_conversation', { conversation_id: room, conversation_type: 1, members: [user, 'sender'] });
    const net = await NetworkCut.start(env.server.url);
    const page = await (await env.browser.newContext()).newPage();
    await page.goto(`${net.url}/demo/`);
    // The WebSocket handshake "succeeds" at a middlebox that then closes it: no `ready`.
    const blockWs = (ws: { close: () => Promise<void> }) => void ws.close();
    const isWs = (url: URL) => url.searchParams.get('protoc') === 'ws';
    await page.routeWebSocket(isWs, blockWs);
    await pageClient(page, { user, upgradeAfterMs: 1_500 });

    await onTransport(page, 'sse');
    const sent: number[] = [];
    sent.push(...(await env.server.sendMany(room, 'sender', 'on-sse', 10)));
    await until('messages over SSE', async () => (await gotIds(page, room)).length === sent.length);

    // SSE blocked as well, and the open stream cut: long-poll it is.
    await page.route((url) => url.searchParams.get('protoc') === 'sse', (route) => route.abort('connectionrefused'));
    net.down();
    sent.push(...(await env.server.sendMany(room, 'sender', 'cut', 10)));
    net.up();
    await onTransport(page, 'poll');
    sent.push(...(await env.server.sendMany(room, 'sender', 'on-poll', 10)));
    await until('messages over long-poll', async () => (await gotIds(page, room)).length === sent.length);
    const states = (await recorded(page)).states.map((s) => s.transport);
    expect(states).toContain('ws');
    expect(states).toContain('sse');

    // The middlebox is gone: the client tries the preferred transports again and moves up.
    await page.unrouteAll({ behavior: 'ignoreErrors' });
    await page.routeWebSocket(isWs, (ws) => void ws.connectToServer());
    await onTransport(page, 'ws', 60_000);
    sent.push(...(await env.server.sendMany(room, 'sender', 'on-ws', 10)));
    await until('messages over WebSocket', async () => (await gotIds(page, room)).length >= sent.length);
    await sleep(500);
    expect(await gotIds(page, room)).toEqual(sent);
    await page.context().close();
    await net.stop();
  });
});
