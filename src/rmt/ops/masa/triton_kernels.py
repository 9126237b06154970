"""Triton kernels of fused MaSA: one flash-style attention kernel for all three sequence kinds.

A *sequence* is a set of tokens of the ``h x w`` grid that attend to each other:

* ``MODE_ROW``  - the tokens of one grid row (first pass of the decomposed form);
* ``MODE_COL``  - the tokens of one grid column (second pass of the decomposed form);
* ``MODE_FULL`` - all ``h * w`` tokens (the full form).

Every token has grid coordinates ``(r, s)``; the rotation uses ``p = r * w + s`` and the decay
bias is ``lambda * (|r - r'| + |s - s'|)``, which reduces to the 1-D distance along a row or a
column. Inputs are read straight from the ``(b, h, w, n, d)`` projection views through their
strides; rotation, key scaling, decay bias, online softmax and the optional LePE addition happen in
registers, so nothing of size ``(tokens x tokens)`` ever reaches memory.

Log-sum-exp and the backward ``delta`` are kept per token in ``(b, h, w, n)`` layout.
"""
import triton
import triton.language as tl

MODE_ROW = 0
MODE_COL = 1
MODE_FULL = 2


@triton.jit
def _coords(offs, seq_id, W, MODE: tl.constexpr):
    """Grid row and column of the tokens ``offs`` of sequence ``seq_id``."""
    if MODE == 0:
        rows = offs * 0 + seq_id
        cols = offs
    elif MODE == 1:
        rows = offs
        cols = offs * 0 + seq_id
    else:
        rows = offs // W
        cols = offs % W
    return rows, cols


@triton.jit
def _rotate(x, rows, cols, mask, W, SIN, COS, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate channel pairs (2i, 2i+1) of ``x`` [BLOCK, BLOCK_D] (float32) by the token angles.

    Tables ``SIN``/``COS`` are ``(h * w, HEAD_DIM)`` float32 with equal entries for 2i and 2i+1;
    channels past ``HEAD_DIM`` (padding up to ``BLOCK_D``) stay zero.
    ``INVERSE`` applies the transpose (the backward of the rotation).

    Computed as ``x * cos + partner * sin`` with ``partner`` the pair-swapped ``x``: the tables are
    read whole rows at a time (contiguous, like ``x``; both equal entries of a pair), which keeps
    their loads vectorised and coalesced (half rows, every other entry, were gathered one float at
    a time and limited the kernels through the L1 cache).
    """
    offs_d = tl.arange(0, BLOCK_D)
    table = (rows * W + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    tmask = mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    s = tl.load(SIN + table, mask=tmask, other=0.0)
    c = tl.load(COS + table, mask=tmask, other=0.0)
    xe, xo = tl.split(tl.reshape(x, (BLOCK, BLOCK_D // 2, 2)))
    return x * c + tl.reshape(_partner(xe, xo, INVERSE), (BLOCK, BLOCK_D)) * s


@triton.jit
def _partner(xe, xo, INVERSE: tl.constexpr):
    """The pair-swapped channels ``(-x_odd, x_even)`` (``(x_odd, -x_even)`` for the inverse), joined
    in a trailing dimension of 2."""
    if INVERSE:
        return tl.join(xo, -xe)
    return tl.join(-xo, xe)


@triton.jit
def _load_tokens(base, rows, cols, mask, s_h, s_w, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load ``[BLOCK, BLOCK_D]`` rows of a ``(.., h, w, .., d)`` tensor at grid coordinates (zero padded)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + rows[:, None] * s_h + cols[:, None] * s_w + offs_d[None, :],
                   mask=mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tokens(base, value, rows, cols, mask, s_h, s_w, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store ``[BLOCK, BLOCK_D]`` (first ``HEAD_DIM`` channels) at grid coordinates."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + rows[:, None] * s_h + cols[:, None] * s_w + offs_d[None, :], value,
             mask=mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _logits(q, k, rows_m, cols_m, rows_n, cols_n, decay, DOT_PRECISION: tl.constexpr):
    """``q k^T + decay * manhattan distance`` as float32 ``[M, N]``."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    dist = tl.abs(rows_m[:, None] - rows_n[None, :]) + tl.abs(cols_m[:, None] - cols_n[None, :])
    return s + decay * dist.to(tl.float32)


@triton.jit
def _program(NH, DECAY):
    """``(b, head, sequence id, decay)`` of this program: grid axis 1 is sequence * NH + head, axis 2 the image."""
    pid_sn = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    head = pid_sn % NH
    return b, head, pid_sn // NH, tl.load(DECAY + head)


@triton.jit
def _rotated_tokens(base, offs, seq_id, SEQ, W, s_h, s_w, SIN, COS, scale, BLOCK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr):
    """Tokens ``offs`` of one sequence of q or k, times ``scale``, rotated, in the input dtype.

    Returns ``(tokens [BLOCK, BLOCK_D], rows, cols, mask)``.
    """
    mask = offs < SEQ
    rows, cols = _coords(offs, seq_id, W, MODE)
    x = _load_tokens(base, rows, cols, mask, s_h, s_w, HEAD_DIM, BLOCK_D)
    x = _rotate(x.to(tl.float32) * scale, rows, cols, mask, W, SIN, COS, BLOCK, HEAD_DIM, BLOCK_D, False)
    return x.to(base.dtype.element_ty), rows, cols, mask


@triton.jit
def masa_fwd_kernel(
        Q, K, V, O, ADD, LSE, SIN, COS, DECAY,
        q_sb, q_sh, q_sw, q_sn, k_sb, k_sh, k_sw, k_sn, v_sb, v_sh, v_sw, v_sn,
        o_sb, o_sh, o_sw, o_sn, a_sb, a_sh, a_sw, a_sn,
        NH, W, SEQ, TOKENS, scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ADD: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(cdiv(SEQ, BLOCK_M), sequences * NH, b)``; writes ``O = softmax(..) V (+ ADD)`` and LSE."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes a Python float as float64
    pid_m = tl.program_id(0)
    b, head, seq_id, decay = _program(NH, DECAY)
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, rows_m, cols_m, mask_m = _rotated_tokens(
        Q + b * q_sb + head * q_sn, offs_m, seq_id, SEQ, W, q_sh, q_sw,
        SIN, COS, 1.0, BLOCK_M, HEAD_DIM, BLOCK_D, MODE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, SEQ, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, rows_n, cols_n, mask_n = _rotated_tokens(
            K + b * k_sb + head * k_sn, offs_n, seq_id, SEQ, W, k_sh, k_sw,
            SIN, COS, scale, BLOCK_N, HEAD_DIM, BLOCK_D, MODE)
        v = _load_tokens(V + b * v_sb + head * v_sn, rows_n, cols_n, mask_n, v_sh, v_sw, HEAD_DIM, BLOCK_D)
        s = _logits(q, k, rows_m, cols_m, rows_n, cols_n, decay, DOT_PRECISION)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    if HAS_ADD:
        add = _load_tokens(ADD + b * a_sb + head * a_sn, rows_m, cols_m, mask_m, a_sh, a_sw, HEAD_DIM, BLOCK_D)
        acc += add.to(tl.float32)
    _store_tokens(O + b * o_sb + head * o_sn, acc.to(O.dtype.element_ty), rows_m, cols_m, mask_m,
                  o_sh, o_sw, HEAD_DIM, BLOCK_D)
    if STORE_LSE:
        tok = (b * TOKENS + rows_m * W + cols_m) * NH + head
        tl.store(LSE + tok, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def masa_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, SIN, COS, DECAY,
        q_sb, q_sh, q_sw, q_sn, k_sb, k_sh, k_sw, k_sn, v_sb, v_sh, v_sw, v_sn,
        g_sb, g_sh, g_sw, g_sn,
        NH, W, SEQ, TOKENS, scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid ``(cdiv(SEQ, BLOCK_N), sequences * NH, b)``: gradients of the raw k and of v.

    ``DO``, ``DK``, ``DV`` share the contiguous ``(b, h, w, n, d)`` strides ``g_*``.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes a Python float as float64
    pid_n = tl.program_id(0)
    b, head, seq_id, decay = _program(NH, DECAY)
    dtype = Q.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, rows_n, cols_n, mask_n = _rotated_tokens(
        K + b * k_sb + head * k_sn, offs_n, seq_id, SEQ, W, k_sh, k_sw,
        SIN, COS, scale, BLOCK_N, HEAD_DIM, BLOCK_D, MODE)
    v = _load_tokens(V + b * v_sb + head * v_sn, rows_n, cols_n, mask_n, v_sh, v_sw, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, SEQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, rows_m, cols_m, mask_m = _rotated_tokens(
            Q + b * q_sb + head * q_sn, offs_m, seq_id, SEQ, W, q_sh, q_sw,
            SIN, COS, 1.0, BLOCK_M, HEAD_DIM, BLOCK_D, MODE)
        do = _load_tokens(DO + b * g_sb + head * g_sn, rows_m, cols_m, mask_m, g_sh, g_sw, HEAD_DIM, BLOCK_D)
        tok = (b * TOKENS + rows_m * W + cols_m) * NH + head
        lse = tl.load(LSE + tok, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + tok, mask=mask_m, other=0.0)
        s = _logits(q, k, rows_m, cols_m, rows_n, cols_n, decay, DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(dtype)), q, input_precision=DOT_PRECISION)
    dk = _rotate(dk, rows_n, cols_n, mask_n, W, SIN, COS, BLOCK_N, HEAD_DIM, BLOCK_D, True) * scale
    base = b * g_sb + head * g_sn
    _store_tokens(DK + base, dk.to(DK.dtype.element_ty), rows_n, cols_n, mask_n, g_sh, g_sw, HEAD_DIM, BLOCK_D)
    _store_tokens(DV + base, dv.to(DV.dtype.element_ty), rows_n, cols_n, mask_n, g_sh, g_sw, HEAD_DIM, BLOCK_D)


@triton.jit
def masa_bwd_dq_kernel(
        Q, K, V, O, DO, LSE, DELTA, DQ, SIN, COS, DECAY,
        q_sb, q_sh, q_sw, q_sn, k_sb, k_sh, k_sw, k_sn, v_sb, v_sh, v_sw, v_sn,
        g_sb, g_sh, g_sw, g_sn,
        NH, W, SEQ, TOKENS, scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid ``(cdiv(SEQ, BLOCK_M), sequences * NH, b)``: gradient of the raw q.

    Also computes ``delta = rowsum(dO * O)`` of its query rows and stores it for the dk/dv kernel,
    which therefore runs after this one. ``O``, ``DO`` and ``DQ`` share the strides ``g_*``.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes a Python float as float64
    pid_m = tl.program_id(0)
    b, head, seq_id, decay = _program(NH, DECAY)
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, rows_m, cols_m, mask_m = _rotated_tokens(
        Q + b * q_sb + head * q_sn, offs_m, seq_id, SEQ, W, q_sh, q_sw,
        SIN, COS, 1.0, BLOCK_M, HEAD_DIM, BLOCK_D, MODE)
    do = _load_tokens(DO + b * g_sb + head * g_sn, rows_m, cols_m, mask_m, g_sh, g_sw, HEAD_DIM, BLOCK_D)
    o = _load_tokens(O + b * g_sb + head * g_sn, rows_m, cols_m, mask_m, g_sh, g_sw, HEAD_DIM, BLOCK_D)
    tok = (b * TOKENS + rows_m * W + cols_m) * NH + head
    lse = tl.load(LSE + tok, mask=mask_m, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + tok, delta, mask=mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, SEQ, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, rows_n, cols_n, mask_n = _rotated_tokens(
            K + b * k_sb + head * k_sn, offs_n, seq_id, SEQ, W, k_sh, k_sw,
            SIN, COS, scale, BLOCK_N, HEAD_DIM, BLOCK_D, MODE)
        v = _load_tokens(V + b * v_sb + head * v_sn, rows_n, cols_n, mask_n, v_sh, v_sw, HEAD_DIM, BLOCK_D)
        s = _logits(q, k, rows_m, cols_m, rows_n, cols_n, decay, DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype), k, input_precision=DOT_PRECISION)
    dq = _rotate(dq, rows_m, cols_m, mask_m, W, SIN, COS, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    _store_tokens(DQ + b * g_sb + head * g_sn, dq.to(DQ.dtype.element_ty), rows_m, cols_m, mask_m,
                  g_sh, g_sw, HEAD_DIM, BLOCK_D)


@triton.jit
def masa_bwd_tile_kernel(
        Q, K, V, O, DO, LSE, DQ, DK, DV, SIN, COS, DECAY,
        q_sb, q_sh, q_sw, q_sn, k_sb, k_sh, k_sw, k_sn, v_sb, v_sh, v_sw, v_sn,
        g_sb, g_sh, g_sw, g_sn, d_sb, d_sh, d_sw, d_sn, e_sb, e_sh, e_sw, e_sn,
        NH, W, SEQ, TOKENS, scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
        ACCUMULATE_QK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(1, sequences * NH, b)`` for sequences of at most ``BLOCK`` tokens: all of dq, dk and
    dv of one sequence from one tile, so the logits and probabilities are formed once (the dq and
    dk/dv kernels each form them again). ``O`` and ``DO`` share the strides ``g_*``, ``DQ`` and ``DK``
    the strides ``d_*`` (slices of one gradient buffer, say), ``DV`` has the strides ``e_*``.
    ``ACCUMULATE_QK`` adds dq and dk to what ``DQ`` and ``DK`` hold instead of overwriting it.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes a Python float as float64
    b, head, seq_id, decay = _program(NH, DECAY)
    dtype = Q.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    q, rows, cols, mask = _rotated_tokens(
        Q + b * q_sb + head * q_sn, offs, seq_id, SEQ, W, q_sh, q_sw,
        SIN, COS, 1.0, BLOCK, HEAD_DIM, BLOCK_D, MODE)
    k, _, _, _ = _rotated_tokens(
        K + b * k_sb + head * k_sn, offs, seq_id, SEQ, W, k_sh, k_sw,
        SIN, COS, scale, BLOCK, HEAD_DIM, BLOCK_D, MODE)
    v = _load_tokens(V + b * v_sb + head * v_sn, rows, cols, mask, v_sh, v_sw, HEAD_DIM, BLOCK_D)
    base = b * g_sb + head * g_sn
    do = _load_tokens(DO + base, rows, cols, mask, g_sh, g_sw, HEAD_DIM, BLOCK_D)
    o = _load_tokens(O + base, rows, cols, mask, g_sh, g_sw, HEAD_DIM, BLOCK_D)
    tok = (b * TOKENS + rows * W + cols) * NH + head
    lse = tl.load(LSE + tok, mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    s = _logits(q, k, rows, cols, rows, cols, decay, DOT_PRECISION)
    p = tl.exp(s - lse[:, None])
    p = tl.where(mask[:, None] & mask[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(dtype)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    dq = _rotate(dq, rows, cols, mask, W, SIN, COS, BLOCK, HEAD_DIM, BLOCK_D, True)
    dk = _rotate(dk, rows, cols, mask, W, SIN, COS, BLOCK, HEAD_DIM, BLOCK_D, True) * scale
    dbase = b * d_sb + head * d_sn
    if ACCUMULATE_QK:
        dq += _load_tokens(DQ + dbase, rows, cols, mask, d_sh, d_sw, HEAD_DIM, BLOCK_D).to(tl.float32)
        dk += _load_tokens(DK + dbase, rows, cols, mask, d_sh, d_sw, HEAD_DIM, BLOCK_D).to(tl.float32)
    _store_tokens(DQ + dbase, dq.to(DQ.dtype.element_ty), rows, cols, mask, d_sh, d_sw, HEAD_DIM, BLOCK_D)
    _store_tokens(DK + dbase, dk.to(DK.dtype.element_ty), rows, cols, mask, d_sh, d_sw, HEAD_DIM, BLOCK_D)
    _store_tokens(DV + b * e_sb + head * e_sn, dv.to(DV.dtype.element_ty), rows, cols, mask, e_sh, e_sw,
                  HEAD_DIM, BLOCK_D)


@triton.jit
def _rotate_seqs(x, pos, mask, SIN, COS, SEQS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """:func:`_rotate` (forward) for ``x`` [SEQS, BLOCK, BLOCK_D] float32 at flat positions ``pos``."""
    offs_d = tl.arange(0, BLOCK_D)
    table = pos[:, :, None] * HEAD_DIM + offs_d[None, None, :]
    tmask = mask[:, :, None] & (offs_d[None, None, :] < HEAD_DIM)
    s = tl.load(SIN + table, mask=tmask, other=0.0)
    c = tl.load(COS + table, mask=tmask, other=0.0)
    xe, xo = tl.split(tl.reshape(x, (SEQS, BLOCK, BLOCK_D // 2, 2)))
    return x * c + tl.reshape(_partner(xe, xo, False), (SEQS, BLOCK, BLOCK_D)) * s


@triton.jit
def _load_seqs(base, rows, cols, mask, s_h, s_w, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load ``[SEQS, BLOCK, BLOCK_D]`` tokens at grid coordinates ``rows``/``cols`` [SEQS, BLOCK] (zero padded)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + rows[:, :, None] * s_h + cols[:, :, None] * s_w + offs_d[None, None, :],
                   mask=mask[:, :, None] & (offs_d[None, None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_seqs(base, value, rows, cols, mask, s_h, s_w, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store ``[SEQS, BLOCK, BLOCK_D]`` (first ``HEAD_DIM`` channels) at grid coordinates."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + rows[:, :, None] * s_h + cols[:, :, None] * s_w + offs_d[None, None, :], value,
             mask=mask[:, :, None] & (offs_d[None, None, :] < HEAD_DIM))


@triton.jit
def masa_fwd_seqs_kernel(
        Q, K, V, O, ADD, LSE, SIN, COS, DECAY,
        q_sb, q_sh, q_sw, q_sn, k_sb, k_sh, k_sw, k_sn, v_sb, v_sh, v_sw, v_sn,
        o_sb, o_sh, o_sw, o_sn, a_sb, a_sh, a_sw, a_sn,
        NH, W, SEQ, NSEQ, TOKENS, scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
        SEQS: tl.constexpr, HAS_ADD: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(cdiv(NSEQ, SEQS) * NH, b)``: ``SEQS`` whole rows (``MODE_ROW``) or columns
    (``MODE_COL``) of at most ``BLOCK`` tokens per program, as batched ``[SEQS, BLOCK, BLOCK]``
    products, so that the short sequences of the later stages (14 or 28 tokens at 224x224) give each
    program more than one small tile of work. Same outputs as :func:`masa_fwd_kernel`."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes a Python float as float64
    pid = tl.program_id(0)
    head = pid % NH
    b = tl.program_id(1).to(tl.int64)
    decay = tl.load(DECAY + head)
    seq_ids = (pid // NH) * SEQS + tl.arange(0, SEQS)
    offs = tl.arange(0, BLOCK)
    zero = seq_ids[:, None] * 0 + offs[None, :] * 0
    if MODE == 0:
        rows = seq_ids[:, None] + zero
        cols = offs[None, :] + zero
    else:
        rows = offs[None, :] + zero
        cols = seq_ids[:, None] + zero
    key_ok = offs < SEQ
    mask = (seq_ids < NSEQ)[:, None] & key_ok[None, :]
    pos = rows * W + cols
    dtype = Q.dtype.element_ty

    q = _load_seqs(Q + b * q_sb + head * q_sn, rows, cols, mask, q_sh, q_sw, HEAD_DIM, BLOCK_D)
    q = _rotate_seqs(q.to(tl.float32), pos, mask, SIN, COS, SEQS, BLOCK, HEAD_DIM, BLOCK_D).to(dtype)
    k = _load_seqs(K + b * k_sb + head * k_sn, rows, cols, mask, k_sh, k_sw, HEAD_DIM, BLOCK_D)
    k = _rotate_seqs(k.to(tl.float32) * scale, pos, mask, SIN, COS, SEQS, BLOCK, HEAD_DIM, BLOCK_D).to(dtype)
    v = _load_seqs(V + b * v_sb + head * v_sn, rows, cols, mask, v_sh, v_sw, HEAD_DIM, BLOCK_D)

    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=DOT_PRECISION)
    dist = tl.abs(offs[:, None] - offs[None, :]).to(tl.float32)
    s = tl.where(key_ok[None, None, :], s + decay * dist[None, :, :], float("-inf"))
    m = tl.max(s, 2)
    p = tl.exp(s - m[:, :, None])
    l = tl.sum(p, 2)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION) / l[:, :, None]
    if HAS_ADD:
        add = _load_seqs(ADD + b * a_sb + head * a_sn, rows, cols, mask, a_sh, a_sw, HEAD_DIM, BLOCK_D)
        acc += add.to(tl.float32)
    _store_seqs(O + b * o_sb + head * o_sn, acc.to(O.dtype.element_ty), rows, cols, mask, o_sh, o_sw,
                HEAD_DIM, BLOCK_D)
    if STORE_LSE:
        tl.store(LSE + (b * TOKENS + pos) * NH + head, m + tl.log(l), mask=mask)
