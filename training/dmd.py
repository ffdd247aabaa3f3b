"""Stage 3: gradient-reweighted DMD with Self-Forcing rollouts (paper 4.2, Eq. 3 and 6).

* Generator: the teacher-forced few-step model, rolled out chunk by chunk through the inference
  code itself (the session orchestrator, `VideoSession.rollout_chunk`: same noise, KV cache, RoPE
  and context pass).
  Each chunk stops at a random exit step of the [1000, 750, 500, 250] schedule; only that
  step's forward keeps a graph, so gradients flow through the exit steps alone.
* Real score: the frozen bidirectional teacher. Fake score: a copy of the teacher trained with
  flow matching on generator samples. Both see [reference, garment, noisy video] like the teacher.
* Generator loss (DMD2 / Self-Forcing form): with x_t = noised rollout and x0 predictions of both
  scores, g = (x0_fake - x0_real) / mean|x0 - x0_real|; GR-DMD scales g per latent frame by
  A = F * softmax(-R / tau) from a frame reward; loss = 0.5 * mean((x0 - sg[x0 - A g])^2), whose
  gradient w.r.t. x0 is A g / numel. A constant reward gives A = 1 exactly (plain DMD).
* The fake score takes `fake_updates_per_generator` (5) optimizer steps per generator step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models.dit import DenseAttention
from shared.models.presets import Preset
from shared.models.rope import RopeTable
from shared.runtime.pipeline import VideoSession

from .config import DMDStage
from .flow import add_noise, keyed_generator, sample_sigmas, stack_noise
from .models import TrainDiT
from .rewards import FrameReward, frame_weights
from .teacher import in_context_sequence


def dmd_loss(
    x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, weighted normalised gradient g) for generator samples x0 [B, C, F, h, w].

    fake_x0/real_x0 are the score networks' x0 predictions (no graph); weights [B, F] or None.
    """
    with torch.no_grad():
        normalizer = (x0.double() - real_x0.double()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((fake_x0.double() - real_x0.double()) / normalizer)
        if weights is not None:
            grad = grad * weights.double()[:, None, :, None, None]
        target = x0.double() - grad
    loss = 0.5 * F.mse_loss(x0.double(), target, reduction="mean")
    return loss.float(), grad


class GRDMD:
    """Rollouts and the two losses of GR-DMD; the trainer owns models and optimizers."""

    def __init__(
        self,
        preset: Preset,
        cfg: DMDStage,
        seed: int,
        rope: RopeTable,
        reward: FrameReward | None,
        null_text: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ):
        st = preset.streaming
        if cfg.data.latent_frames % st.chunk_frames:
            raise ValueError(f"latent_frames={cfg.data.latent_frames} is not a multiple of chunk_frames")
        if cfg.real_guidance_scale != 1.0 and null_text is None:
            raise ValueError("classifier-free guidance of the real score needs the dataset's null text")
        if cfg.data.latent_frames > st.max_cache_frames and cfg.parallel.activation_checkpointing:
            # A checkpointed exit step is recomputed in backward against the cache; once the window
            # evicts (ring slots overwritten) it would read other keys than the forward did.
            raise ValueError("rollouts longer than the KV cache need parallel.activation_checkpointing=false")
        self.preset, self.cfg, self.seed, self.rope = preset, cfg, seed, rope
        self.reward = reward  # None: plain DMD without any weighting
        self.null_text = null_text
        self.device, self.dtype = device, dtype
        self.cond_frames = st.cond_frames
        self.num_chunks = cfg.data.latent_frames // st.chunk_frames
        self.num_exit = len(st.timesteps)

    # ---- rollouts ----------------------------------------------------------------------------
    def exit_steps(self, step: int, role: str) -> list[int]:
        """Exit step per chunk; keyed by the step only, so every rank takes the same path."""
        gen = keyed_generator(self.seed, "dmd-exit", role, step)
        n = self.num_chunks if self.cfg.exit_step_per_chunk else 1
        draws = torch.randint(0, self.num_exit, (n,), generator=gen).tolist()
        return draws if self.cfg.exit_step_per_chunk else draws * self.num_chunks

    def rollout(self, generator: TrainDiT, batch: dict, positions: list[int], step: int, role: str) -> torch.Tensor:
        """Self-Forcing rollout of every sample: x0 [B, C, F, h, w] (graph through exit steps
        when grad is enabled). Session noise is keyed by the sample's global position."""
        exits = self.exit_steps(step, role)
        videos = []
        for b, position in enumerate(positions):
            seed = int(
                torch.randint(0, 2**62, (1,), generator=keyed_generator(self.seed, "dmd-rollout", role, position))
            )
            session = VideoSession.of_model(generator, self.preset, self.device, self.dtype, rope=self.rope)
            session.open_latents(
                batch["reference"][b : b + 1], batch["garment"][b : b + 1], batch["text_full"][b : b + 1], seed
            )
            # Inference caches the projected prompt per session; here it keeps a graph so the exit
            # steps train the text projection too (the cond pass in `open` stays graph-free).
            session.project_text_with_grad()
            videos.append(torch.cat([session.rollout_chunk(e) for e in exits], dim=2))
            session.close()
        return torch.cat(videos, dim=0)

    # ---- scores ------------------------------------------------------------------------------
    def _noised(self, x0: torch.Tensor, positions: list[int], purpose: str):
        gens = [keyed_generator(self.seed, purpose, p) for p in positions]
        c = self.cfg
        sigma = torch.stack([sample_sigmas(g, 1, c.shift, c.min_u, c.max_u) for g in gens])  # [B, 1]
        sigma = sigma.expand(x0.shape[0], x0.shape[2]).to(x0.device)  # [B, F]
        eps = stack_noise(gens, x0.shape[1:], x0.device, x0.dtype)
        return add_noise(x0, eps, sigma), eps, sigma

    def flow(self, model: TrainDiT, x_t: torch.Tensor, sigma: torch.Tensor, batch: dict, text: torch.Tensor):
        """Bidirectional in-context flow prediction on the video frames [B, C, F, h, w]."""
        latents, timesteps = in_context_sequence(batch, x_t, 1000.0 * sigma)
        attn = DenseAttention(self.rope, list(range(latents.shape[2])))
        return model.text_and_forward(latents, timesteps, text, attn)[:, :, self.cond_frames :]

    def score_x0(self, model: TrainDiT, x_t, sigma, batch, guidance: float = 1.0) -> torch.Tensor:
        v = self.flow(model, x_t, sigma, batch, batch["text_full"]).float()
        if guidance != 1.0:
            null = self.null_text.to(batch["text_full"])[None].expand_as(batch["text_full"])
            v_null = self.flow(model, x_t, sigma, batch, null).float()
            v = v_null + guidance * (v - v_null)
        return x_t.float() - sigma[:, None, :, None, None] * v

    # ---- losses ------------------------------------------------------------------------------
    def generator_loss(
        self, generator: TrainDiT, fake: TrainDiT, real: TrainDiT, batch: dict, positions: list[int], step: int
    ) -> tuple[torch.Tensor, dict]:
        x0 = self.rollout(generator, batch, positions, step, "generator")  # graph through exit steps
        with torch.no_grad():
            x_t, _, sigma = self._noised(x0.detach(), positions, "dmd-generator-noise")
            fake_x0 = self.score_x0(fake, x_t, sigma, batch)
            real_x0 = self.score_x0(real, x_t, sigma, batch, self.cfg.real_guidance_scale)
            weights = None
            metrics = {}
            if self.reward is not None:
                rewards = self.reward(x0.detach().float())  # [B, F]
                weights = frame_weights(rewards, self.cfg.reward.tau)
                metrics = {"reward_mean": rewards.mean(), "weight_max": weights.max()}
        loss, grad = dmd_loss(x0.float(), fake_x0, real_x0, weights)
        return loss, {"generator_loss": loss.detach(), "dmd_grad_norm": grad.norm().float(), **metrics}

    def fake_loss(
        self, generator: TrainDiT, fake: TrainDiT, batch: dict, positions: list[int], step: int
    ) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            x0 = self.rollout(generator, batch, positions, step, "fake")
            x_t, eps, sigma = self._noised(x0, positions, "dmd-fake-noise")
        v = self.flow(fake, x_t, sigma, batch, batch["text_full"])
        loss = F.mse_loss(v.float(), (eps - x0).float())
        return loss, {"fake_loss": loss.detach()}
