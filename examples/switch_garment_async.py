"""Switch garments while the video streams (asyncio client).

The same as examples/switch_garment.py, with `AsyncStudioClient`: the switch is sent from a
separate task while the stream keeps being read, as an event-driven UI would (a button press).

    python examples/switch_garment_async.py --target 127.0.0.1:9000 --api-key dev-... --out switch.mp4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path

from services.studio.client import AsyncStudioClient

HERE = Path(__file__).resolve().parent
PROMPT = "The person waves with the right hand steadily."


async def run(args: argparse.Namespace) -> dict:
    person = (HERE / "person.png").read_bytes()
    red, green = (HERE / "garment-red.png").read_bytes(), (HERE / "garment-green.png").read_bytes()
    result: dict = {"out": args.out}
    async with AsyncStudioClient(args.target, args.api_key) as client:
        session = await client.create_session(person, red, PROMPT, seed=0, options={"max_chunks": args.chunks})
        result["session_id"] = session.session_id

        async def switch() -> None:  # e.g. a button press while the video plays
            ack = await client.switch_garment(session.session_id, green)
            result["switch"] = {"garment_id": ack.garment_id, "effective_chunk_index": ack.effective_chunk_index}

        tasks = []
        with open(args.out, "wb") as f:
            async with contextlib.aclosing(client.stream(session.session_id)) as chunks:
                async for chunk in chunks:
                    if chunk.end_of_stream:
                        break
                    f.write(chunk.fmp4)  # fragments append into one playable MP4
                    if chunk.switch_applied:  # the first chunk wearing the new garment
                        result["switch_applied_at_chunk"] = chunk.index
                    if chunk.index == args.switch_after:
                        tasks.append(asyncio.create_task(switch()))  # the stream is not paused
                    result["chunks"] = chunk.index + 1
        await asyncio.gather(*tasks)
        await client.close_session(session.session_id)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="127.0.0.1:9000", help="Studio gRPC address (default 127.0.0.1:9000)")
    p.add_argument("--api-key", required=True, help="API key (`fashionchameleon up` prints one)")
    p.add_argument("--out", default="switch.mp4", help="where to save the clip (default switch.mp4)")
    p.add_argument("--chunks", type=int, default=6, help="chunks to generate (default 6)")
    p.add_argument("--switch-after", type=int, default=1, help="switch after receiving this chunk (default 1)")
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
