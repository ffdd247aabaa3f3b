"""Switch garments while the video streams (blocking client).

Start the services in another terminal (`fashionchameleon up` prints the target and an API key),
then:

    python examples/switch_garment.py --target 127.0.0.1:9000 --api-key dev-... --out switch.mp4

Opens a session wearing garment-red.png, streams it to --out (one fragmented MP4, playable as
it grows), switches to garment-green.png after chunk --switch-after, prints what the service
acknowledged and which chunk first showed the new garment as one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.studio.client import StudioClient

HERE = Path(__file__).resolve().parent
PROMPT = "The person waves with the right hand steadily."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="127.0.0.1:9000", help="Studio gRPC address (default 127.0.0.1:9000)")
    p.add_argument("--api-key", required=True, help="API key (`fashionchameleon up` prints one)")
    p.add_argument("--out", default="switch.mp4", help="where to save the clip (default switch.mp4)")
    p.add_argument("--chunks", type=int, default=6, help="chunks to generate (default 6)")
    p.add_argument("--switch-after", type=int, default=1, help="switch after receiving this chunk (default 1)")
    args = p.parse_args()

    person = (HERE / "person.png").read_bytes()
    red, green = (HERE / "garment-red.png").read_bytes(), (HERE / "garment-green.png").read_bytes()
    result: dict = {"out": args.out}
    with StudioClient(args.target, args.api_key) as client, open(args.out, "wb") as f:
        session = client.create_session(person, red, PROMPT, seed=0, options={"max_chunks": args.chunks})
        result["session_id"] = session.session_id
        for chunk in client.stream(session.session_id):
            if chunk.end_of_stream:
                break
            f.write(chunk.fmp4)  # fragments append into one playable MP4
            if chunk.switch_applied:  # the first chunk wearing the new garment
                result["switch_applied_at_chunk"] = chunk.index
            if chunk.index == args.switch_after:
                ack = client.switch_garment(session.session_id, green)  # returns at once; streaming goes on
                result["switch"] = {"garment_id": ack.garment_id, "effective_chunk_index": ack.effective_chunk_index}
            result["chunks"] = chunk.index + 1
        client.close_session(session.session_id)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
