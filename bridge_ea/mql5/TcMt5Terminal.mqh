//+------------------------------------------------------------------+
//| TcMt5Terminal.mqh - MetaTrader 5 side of CTcTerminal             |
//|                                                                  |
//| Snapshot, state hash and account frames, and follower command    |
//| execution with OrderSend. Used by the EA (when it owns the       |
//| connector socket) and by the service: both may trade in MT5.     |
//+------------------------------------------------------------------+
#ifndef TC_MT5_TERMINAL_MQH
#define TC_MT5_TERMINAL_MQH

#include <Tradecopy\TcBridge.mqh>

//+------------------------------------------------------------------+
//| The trade server's answer as text (like CTrade's                 |
//| FormatRequestResult). Numeric cases so that older builds, which  |
//| lack some constant names, still compile.                         |
//+------------------------------------------------------------------+
string TcRetcodeText(const uint retcode)
  {
   switch(retcode)
     {
      case 10004: return "requote";
      case 10006: return "request rejected";
      case 10007: return "request canceled by trader";
      case 10008: return "order placed";
      case 10009: return "request completed";
      case 10010: return "only part of the request was completed";
      case 10011: return "request processing error";
      case 10012: return "request canceled by timeout";
      case 10013: return "invalid request";
      case 10014: return "invalid volume in the request";
      case 10015: return "invalid price in the request";
      case 10016: return "invalid stops in the request";
      case 10017: return "trade is disabled";
      case 10018: return "market is closed";
      case 10019: return "there is not enough money to complete the request";
      case 10020: return "prices changed";
      case 10021: return "there are no quotes to process the request";
      case 10022: return "invalid order expiration date in the request";
      case 10023: return "order state changed";
      case 10024: return "too frequent requests";
      case 10025: return "no changes in request";
      case 10026: return "autotrading disabled by server";
      case 10027: return "autotrading disabled by client terminal";
      case 10028: return "request locked for processing";
      case 10029: return "order or position frozen";
      case 10030: return "invalid order filling type";
      case 10031: return "no connection with the trade server";
      case 10032: return "operation is allowed only for live accounts";
      case 10033: return "the number of pending orders has reached the limit";
      case 10034: return "the volume of orders and positions for the symbol has reached the limit";
      case 10035: return "incorrect or prohibited order type";
      case 10036: return "position with the specified identifier has already been closed";
      case 10038: return "a close volume exceeds the current position volume";
      case 10039: return "a close order already exists for the specified position";
      case 10040: return "the number of open positions has reached the limit";
      case 10041: return "the pending order activation request is rejected, the order is canceled";
      case 10042: return "only long positions are allowed";
      case 10043: return "only short positions are allowed";
      case 10044: return "only position closing is allowed";
      case 10045: return "position closing is allowed only by FIFO rule";
      case 10046: return "opposite positions on a single symbol are disabled";
     }
   return "retcode " + IntegerToString(retcode);
  }

bool TcRetcodeOk(const uint retcode)
  {
   return retcode == TRADE_RETCODE_DONE || retcode == TRADE_RETCODE_DONE_PARTIAL || retcode == TRADE_RETCODE_PLACED;
  }

string TcMt5OrderTypeText(const long type)
  {
   switch((int)type)
     {
      case ORDER_TYPE_BUY_LIMIT:
         return "buy_limit";
      case ORDER_TYPE_SELL_LIMIT:
         return "sell_limit";
      case ORDER_TYPE_BUY_STOP:
         return "buy_stop";
      case ORDER_TYPE_SELL_STOP:
         return "sell_stop";
     }
   return "";   // market and stop-limit orders have no protocol order_type
  }

bool TcMt5IsPending(const long type)
  {
   return TcMt5OrderTypeText(type) != "";
  }

ENUM_ORDER_TYPE TcMt5OrderTypeFromProtocol(const int t)
  {
   switch(t)
     {
      case TC_OT_BUY_LIMIT:
         return ORDER_TYPE_BUY_LIMIT;
      case TC_OT_SELL_LIMIT:
         return ORDER_TYPE_SELL_LIMIT;
      case TC_OT_BUY_STOP:
         return ORDER_TYPE_BUY_STOP;
     }
   return ORDER_TYPE_SELL_STOP;
  }

string TcMt5TradeModeText(const string symbol)
  {
   switch((int)SymbolInfoInteger(symbol, SYMBOL_TRADE_MODE))
     {
      case SYMBOL_TRADE_MODE_DISABLED:
         return "disabled";
      case SYMBOL_TRADE_MODE_LONGONLY:
         return "long_only";
      case SYMBOL_TRADE_MODE_SHORTONLY:
         return "short_only";
      case SYMBOL_TRADE_MODE_CLOSEONLY:
         return "close_only";
     }
   return "full";
  }

//+------------------------------------------------------------------+
//| Filling policies to try for a request, best first.               |
//| SYMBOL_FILLING_MODE is a bitmask of what the broker allows for   |
//| market orders (FOK=1, IOC=2). RETURN needs no flag but is not    |
//| accepted for market orders under Market execution. Copies prefer|
//| FOK: all or nothing, like the master's fill. Pending orders are  |
//| placed with RETURN first (what the terminal itself uses).        |
//| On TRADE_RETCODE_INVALID_FILL the next candidate is tried.       |
//+------------------------------------------------------------------+
int TcMt5FillingCandidates(const string symbol, const bool pending, ENUM_ORDER_TYPE_FILLING &out[])
  {
   ArrayResize(out, 0);
   long flags = SymbolInfoInteger(symbol, SYMBOL_FILLING_MODE);
   long exemode = SymbolInfoInteger(symbol, SYMBOL_TRADE_EXEMODE);
   int n = 0;
   if(pending)
     {
      ArrayResize(out, n + 1);
      out[n++] = ORDER_FILLING_RETURN;
     }
   if((flags & SYMBOL_FILLING_FOK) == SYMBOL_FILLING_FOK)
     {
      ArrayResize(out, n + 1);
      out[n++] = ORDER_FILLING_FOK;
     }
   if((flags & SYMBOL_FILLING_IOC) == SYMBOL_FILLING_IOC)
     {
      ArrayResize(out, n + 1);
      out[n++] = ORDER_FILLING_IOC;
     }
   if(!pending && (exemode != SYMBOL_TRADE_EXECUTION_MARKET || n == 0))
     {
      ArrayResize(out, n + 1);
      out[n++] = ORDER_FILLING_RETURN;
     }
   return n;
  }

string TcMt5FillingText(const string symbol)
  {
   ENUM_ORDER_TYPE_FILLING c[];
   TcMt5FillingCandidates(symbol, false, c);
   if(ArraySize(c) == 0 || c[0] == ORDER_FILLING_RETURN)
      return "return";
   return c[0] == ORDER_FILLING_FOK ? "fok" : "ioc";
  }

//+------------------------------------------------------------------+
//| MT5 terminal adapter                                             |
//+------------------------------------------------------------------+
class CTcMt5Terminal : public CTcTerminal
  {
private:
   long              m_magic;
   int               m_deviation;
   string            m_symbolsCfg;     // "" = Market Watch, else comma separated
   int               m_recoverDays;
   //--- copies made by this account, by comment: "P|sym|magic|comment" -> position,
   //--- "O|sym|magic|comment" -> pending order. Rebuilt from positions, orders and history
   //--- on start, so a restart still recognises the copies it made (see FindCopy).
   CTcStrMap         m_copyIdx;
   string            m_copyTicket[];
   int               m_copyN;

   long              Magic(CTcJsonObject &cmd) { long m = cmd.Int("magic"); return m != 0 ? m : m_magic; }
   int               Deviation(CTcJsonObject &cmd)
     {
      long d = cmd.Int("deviation_points");
      return d > 0 ? (int)d : m_deviation;
     }
   double            Norm(const string symbol, const double price)
     {
      if(price <= 0.0)
         return 0.0;
      return NormalizeDouble(price, (int)SymbolInfoInteger(symbol, SYMBOL_DIGITS));
     }
   string            CopyKey(const string kind, const string symbol, const long magic, const string comment)
     {
      return kind + "|" + symbol + "|" + IntegerToString(magic) + "|" + comment;
     }
   void              Remember(const string key, const string ticket)
     {
      int i;
      if(m_copyIdx.Get(key, i))
        {
         m_copyTicket[i] = ticket;
         return;
        }
      if(m_copyN >= ArraySize(m_copyTicket))
         ArrayResize(m_copyTicket, MathMax(64, m_copyN * 2));
      m_copyTicket[m_copyN] = ticket;
      m_copyIdx.Set(key, m_copyN);
      m_copyN++;
     }
   string            Remembered(const string key)
     {
      int i;
      if(m_copyIdx.Get(key, i))
         return m_copyTicket[i];
      return "";
     }

   //--- OrderSend with the filling fallback and, when market_price, a bounded retry on
   //--- requotes at the fresh price
   bool              Send(MqlTradeRequest &req, MqlTradeResult &res, const bool pending, const bool market_price)
     {
      ENUM_ORDER_TYPE_FILLING fill[];
      int nf = TcMt5FillingCandidates(req.symbol, pending, fill);
      for(int attempt = 0; attempt < 3; attempt++)
        {
         for(int f = 0; f < MathMax(1, nf); f++)
           {
            if(nf > 0)
               req.type_filling = fill[f];
            ZeroMemory(res);
            ResetLastError();
            //--- false with retcode 0: refused by the terminal itself (see Reason / GetLastError)
            if(!OrderSend(req, res) && res.retcode == 0)
               break;
            if(res.retcode != TRADE_RETCODE_INVALID_FILL)
               break;
           }
         //--- a requote / moved price means nothing was traded: refresh and try again
         bool moved = (res.retcode == TRADE_RETCODE_REQUOTE || res.retcode == TRADE_RETCODE_PRICE_CHANGED ||
                       res.retcode == TRADE_RETCODE_PRICE_OFF);
         if(!moved || !market_price)
            break;
         MqlTick tick;
         if(!SymbolInfoTick(req.symbol, tick))
            break;
         req.price = (req.type == ORDER_TYPE_BUY) ? tick.ask : tick.bid;
        }
      return TcRetcodeOk(res.retcode);
     }

   string            Reason(const MqlTradeResult &res)
     {
      if(res.retcode == 0)
         return "ea: OrderSend failed in the terminal, error " + IntegerToString(GetLastError());
      string r = TcRetcodeText(res.retcode);
      if(StringLen(res.comment) > 0)
         r += " (" + res.comment + ")";
      return r;
     }

   long              DealTimeNs(const ulong deal)
     {
      if(deal > 0 && HistoryDealSelect(deal))
         return TcServerMscToUtcNs(HistoryDealGetInteger(deal, DEAL_TIME_MSC));
      return TcUtcNowNs();
     }

   string            FindPositionByComment(const string symbol, const long magic, const string comment)
     {
      for(int i = PositionsTotal() - 1; i >= 0; i--)
        {
         ulong t = PositionGetTicket(i);
         if(t == 0)
            continue;
         if(PositionGetString(POSITION_COMMENT) == comment && PositionGetInteger(POSITION_MAGIC) == magic &&
            (symbol == "" || PositionGetString(POSITION_SYMBOL) == symbol))
            return IntegerToString((long)t);
        }
      return "";
     }
   string            FindOrderByComment(const string symbol, const long magic, const string comment)
     {
      for(int i = OrdersTotal() - 1; i >= 0; i--)
        {
         ulong t = OrderGetTicket(i);
         if(t == 0)
            continue;
         if(OrderGetString(ORDER_COMMENT) == comment && OrderGetInteger(ORDER_MAGIC) == magic &&
            (symbol == "" || OrderGetString(ORDER_SYMBOL) == symbol))
            return IntegerToString((long)t);
        }
      return "";
     }

   //--- open
   string            DoOpen(CTcJsonObject &cmd)
     {
      string sym = cmd.Str("symbol");
      if(!SymbolSelect(sym, true))
         return TcRefuseTail("ea: unknown symbol " + sym);
      string side = cmd.Str("side");
      if(side != "buy" && side != "sell")
         return TcRefuseTail("ea: open needs side buy or sell");
      double vol = TcNormalizeVolume(sym, cmd.Num("volume"));
      if(vol <= 0.0)
         return TcRefuseTail("ea: open needs a positive volume");
      MqlTick tick;
      if(!SymbolInfoTick(sym, tick) || tick.ask <= 0.0 || tick.bid <= 0.0)
         return TcRefuseTail("ea: no quote for " + sym);
      double px = (side == "buy") ? tick.ask : tick.bid;
      double point = SymbolInfoDouble(sym, SYMBOL_POINT);
      int dev = Deviation(cmd);
      //--- the requested price plus deviation_points is a hard limit: checked here because
      //--- under Market execution the server ignores the request's deviation
      double want = cmd.Num("price");
      bool limited = (want > 0.0 && cmd.Int("deviation_points") > 0 && point > 0.0);
      if(limited && MathAbs(px - want) > dev * point + point / 2.0)
         return TcRefuseTail(StringFormat("ea: price deviation: %s %s, requested %s, limit %d points",
                                          side == "buy" ? "ask" : "bid", DoubleToString(px, (int)SymbolInfoInteger(sym, SYMBOL_DIGITS)),
                                          DoubleToString(want, (int)SymbolInfoInteger(sym, SYMBOL_DIGITS)), dev));
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_DEAL;
      req.symbol = sym;
      req.volume = vol;
      req.type = (side == "buy") ? ORDER_TYPE_BUY : ORDER_TYPE_SELL;
      req.price = px;
      req.sl = Norm(sym, cmd.Num("sl"));
      req.tp = Norm(sym, cmd.Num("tp"));
      req.deviation = (ulong)dev;
      req.magic = (ulong)Magic(cmd);
      req.comment = TcClipComment(cmd.Str("comment"));
      //--- with a price limit, a requote is an answer (no blind retry at a worse price)
      bool ok = Send(req, res, false, !limited);
      string ticket = "";
      if(ok)
        {
         //--- the position's ticket is the deal's position id (= the opening order's ticket)
         long pos = 0;
         if(res.deal > 0 && HistoryDealSelect(res.deal))
            pos = HistoryDealGetInteger(res.deal, DEAL_POSITION_ID);
         if(pos == 0)
            pos = (long)res.order;
         ticket = IntegerToString(pos);
         if(TcIsKeyComment(req.comment))
            Remember(CopyKey("P", sym, (long)req.magic, req.comment), ticket);
        }
      return TcResultTail(ok, res.retcode, Reason(res), ticket, res.price, res.volume, DealTimeNs(res.deal));
     }

   //--- close (full or partial)
   string            DoClose(CTcJsonObject &cmd, const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      if(t == 0 || !PositionSelectByTicket(t))
         return TcRefuseTail("ea: position " + ticket + " not found (already closed?)");
      string sym = PositionGetString(POSITION_SYMBOL);
      long type = PositionGetInteger(POSITION_TYPE);
      double have = PositionGetDouble(POSITION_VOLUME);
      double vol = cmd.Num("volume");
      vol = (vol <= 0.0) ? have : MathMin(TcNormalizeVolume(sym, vol), have);
      MqlTick tick;
      if(!SymbolInfoTick(sym, tick))
         return TcRefuseTail("ea: no quote for " + sym);
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_DEAL;
      req.position = t;
      req.symbol = sym;
      req.volume = vol;
      req.type = (type == POSITION_TYPE_BUY) ? ORDER_TYPE_SELL : ORDER_TYPE_BUY;
      req.price = (type == POSITION_TYPE_BUY) ? tick.bid : tick.ask;
      req.deviation = (ulong)Deviation(cmd);
      req.magic = (ulong)PositionGetInteger(POSITION_MAGIC);
      bool ok = Send(req, res, false, true);
      //--- MT5 keeps the ticket through partial closes
      return TcResultTail(ok, res.retcode, Reason(res), ticket, res.price, res.volume, DealTimeNs(res.deal));
     }

   //--- SL/TP of a position; an absent level removes it
   string            DoModify(CTcJsonObject &cmd, const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      if(t == 0 || !PositionSelectByTicket(t))
         return TcRefuseTail("ea: position " + ticket + " not found");
      string sym = PositionGetString(POSITION_SYMBOL);
      double sl = Norm(sym, cmd.Num("sl"));
      double tp = Norm(sym, cmd.Num("tp"));
      double point = SymbolInfoDouble(sym, SYMBOL_POINT);
      if(MathAbs(PositionGetDouble(POSITION_SL) - sl) < point / 2.0 && MathAbs(PositionGetDouble(POSITION_TP) - tp) < point / 2.0)
         return TcResultTail(true, TRADE_RETCODE_NO_CHANGES, "no changes: levels already set", ticket, 0.0, 0.0, TcUtcNowNs());
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_SLTP;
      req.position = t;
      req.symbol = sym;
      req.sl = sl;
      req.tp = tp;
      req.magic = (ulong)PositionGetInteger(POSITION_MAGIC);
      bool ok = Send(req, res, false, false);
      if(res.retcode == TRADE_RETCODE_NO_CHANGES)
         ok = true;
      return TcResultTail(ok, res.retcode, Reason(res), ticket, 0.0, 0.0, TcUtcNowNs());
     }

   string            DoCloseBy(CTcJsonObject &cmd, const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      ulong o = (ulong)StringToInteger(cmd.Str("opposite_ticket"));
      if(t == 0 || !PositionSelectByTicket(t))
         return TcRefuseTail("ea: position " + ticket + " not found");
      double vt = PositionGetDouble(POSITION_VOLUME);
      string sym = PositionGetString(POSITION_SYMBOL);
      long magic = PositionGetInteger(POSITION_MAGIC);
      if(o == 0 || !PositionSelectByTicket(o))
         return TcRefuseTail("ea: opposite position " + cmd.Str("opposite_ticket") + " not found");
      double vo = PositionGetDouble(POSITION_VOLUME);
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_CLOSE_BY;
      req.position = t;
      req.position_by = o;
      req.symbol = sym;
      req.magic = (ulong)magic;
      bool ok = Send(req, res, false, false);
      return TcResultTail(ok, res.retcode, Reason(res), ticket, res.price, ok ? MathMin(vt, vo) : 0.0, TcUtcNowNs());
     }

   //--- expiration: UTC ns in the protocol, server time in MetaTrader
   void              SetExpiration(MqlTradeRequest &req, const long exp_ns, const long current_type_time)
     {
      if(exp_ns > 0)
        {
         req.type_time = ORDER_TIME_SPECIFIED;
         req.expiration = TcUtcNsToServer(exp_ns);
        }
      else
         if(current_type_time == ORDER_TIME_DAY)
            req.type_time = ORDER_TIME_DAY;
         else
            req.type_time = ORDER_TIME_GTC;
     }

   string            DoPendingPlace(CTcJsonObject &cmd)
     {
      string sym = cmd.Str("symbol");
      if(!SymbolSelect(sym, true))
         return TcRefuseTail("ea: unknown symbol " + sym);
      int ot = TcOrderTypeFromText(cmd.Str("order_type"));
      if(ot == TC_OT_NONE)
         return TcRefuseTail("ea: pending_place needs order_type buy_limit/sell_limit/buy_stop/sell_stop");
      double vol = TcNormalizeVolume(sym, cmd.Num("volume"));
      double price = Norm(sym, cmd.Num("price"));
      if(vol <= 0.0 || price <= 0.0)
         return TcRefuseTail("ea: pending_place needs a positive volume and price");
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_PENDING;
      req.symbol = sym;
      req.volume = vol;
      req.type = TcMt5OrderTypeFromProtocol(ot);
      req.price = price;
      req.sl = Norm(sym, cmd.Num("sl"));
      req.tp = Norm(sym, cmd.Num("tp"));
      req.magic = (ulong)Magic(cmd);
      req.comment = TcClipComment(cmd.Str("comment"));
      SetExpiration(req, cmd.Int("expiration"), ORDER_TIME_GTC);
      bool ok = Send(req, res, true, false);
      string ticket = ok ? IntegerToString((long)res.order) : "";
      if(ok && TcIsKeyComment(req.comment))
         Remember(CopyKey("O", sym, (long)req.magic, req.comment), ticket);
      return TcResultTail(ok, res.retcode, Reason(res), ticket, ok ? price : 0.0, ok ? vol : 0.0, TcUtcNowNs());
     }

   string            DoPendingModify(CTcJsonObject &cmd, const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      if(t == 0 || !OrderSelect(t))
         return TcRefuseTail("ea: pending order " + ticket + " not found");
      string sym = OrderGetString(ORDER_SYMBOL);
      double price = Norm(sym, cmd.Num("price"));
      if(price <= 0.0)
         price = OrderGetDouble(ORDER_PRICE_OPEN);
      double sl = Norm(sym, cmd.Num("sl"));
      double tp = Norm(sym, cmd.Num("tp"));
      long exp_ns = cmd.Int("expiration");
      long type_time = OrderGetInteger(ORDER_TYPE_TIME);
      double point = SymbolInfoDouble(sym, SYMBOL_POINT);
      bool same_exp = (exp_ns == 0 && (type_time == ORDER_TIME_GTC || type_time == ORDER_TIME_DAY)) ||
                      (exp_ns > 0 && (datetime)OrderGetInteger(ORDER_TIME_EXPIRATION) == TcUtcNsToServer(exp_ns));
      if(MathAbs(OrderGetDouble(ORDER_PRICE_OPEN) - price) < point / 2.0 && MathAbs(OrderGetDouble(ORDER_SL) - sl) < point / 2.0 &&
         MathAbs(OrderGetDouble(ORDER_TP) - tp) < point / 2.0 && same_exp)
         return TcResultTail(true, TRADE_RETCODE_NO_CHANGES, "no changes: order already matches", ticket, price, 0.0, TcUtcNowNs());
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_MODIFY;
      req.order = t;
      req.symbol = sym;
      req.price = price;
      req.sl = sl;
      req.tp = tp;
      SetExpiration(req, exp_ns, type_time);
      bool ok = Send(req, res, true, false);
      if(res.retcode == TRADE_RETCODE_NO_CHANGES)
         ok = true;
      return TcResultTail(ok, res.retcode, Reason(res), ticket, ok ? price : 0.0, 0.0, TcUtcNowNs());
     }

   string            DoPendingCancel(const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      if(t == 0 || !OrderSelect(t))
         return TcRefuseTail("ea: pending order " + ticket + " not found (filled, expired or cancelled?)");
      MqlTradeRequest req;
      MqlTradeResult res;
      ZeroMemory(req);
      req.action = TRADE_ACTION_REMOVE;
      req.order = t;
      bool ok = Send(req, res, true, false);
      return TcResultTail(ok, res.retcode, Reason(res), ticket, 0.0, 0.0, TcUtcNowNs());
     }

   //--- account/symbol pieces shared by snapshot and account frames
   void              WriteAccount(CTcJsonWriter &w)
     {
      w.BeginObject("account");
      w.Str("currency", AccountInfoString(ACCOUNT_CURRENCY));
      w.Num("balance", AccountInfoDouble(ACCOUNT_BALANCE));
      w.Num("equity", AccountInfoDouble(ACCOUNT_EQUITY));
      w.Num("margin", AccountInfoDouble(ACCOUNT_MARGIN));
      w.Num("free_margin", AccountInfoDouble(ACCOUNT_MARGIN_FREE));
      w.Int("leverage", AccountInfoInteger(ACCOUNT_LEVERAGE));
      w.EndObject();
     }
   void              WriteSymbol(CTcJsonWriter &w, const string sym)
     {
      w.BeginItem();
      w.Str("symbol", sym);
      w.Num("contract_size", SymbolInfoDouble(sym, SYMBOL_TRADE_CONTRACT_SIZE));
      w.Num("tick_size", SymbolInfoDouble(sym, SYMBOL_TRADE_TICK_SIZE));
      w.Num("tick_value", SymbolInfoDouble(sym, SYMBOL_TRADE_TICK_VALUE));
      w.Int("digits", SymbolInfoInteger(sym, SYMBOL_DIGITS));
      w.Num("volume_min", SymbolInfoDouble(sym, SYMBOL_VOLUME_MIN));
      w.Num("volume_max", SymbolInfoDouble(sym, SYMBOL_VOLUME_MAX));
      w.Num("volume_step", SymbolInfoDouble(sym, SYMBOL_VOLUME_STEP));
      w.Str("trade_mode", TcMt5TradeModeText(sym));
      w.Str("filling", TcMt5FillingText(sym));
      w.EndObject();
     }
   void              AddSymbol(string &list[], const string sym)
     {
      if(StringLen(sym) == 0)
         return;
      int n = ArraySize(list);
      for(int i = 0; i < n; i++)
         if(list[i] == sym)
            return;
      if(n >= 500)
         return;      // keeps a snapshot of a huge Market Watch bounded
      ArrayResize(list, n + 1);
      list[n] = sym;
     }

public:
                     CTcMt5Terminal() : m_magic(0), m_deviation(20), m_recoverDays(7), m_copyN(0) {}

   //--- the master -> follower mapping from comments: live positions and orders, and the
   //--- history of the last recover_days (copies that were opened and already closed)
   void              RebuildCopyIndex()
     {
      m_copyIdx.Init(256);
      m_copyN = 0;
      datetime now = TimeCurrent();
      if(m_recoverDays > 0 && HistorySelect(now - m_recoverDays * 86400, now + 86400))
        {
         int nd = HistoryDealsTotal();
         for(int i = 0; i < nd; i++)
           {
            ulong d = HistoryDealGetTicket(i);
            if(d == 0 || HistoryDealGetInteger(d, DEAL_ENTRY) != DEAL_ENTRY_IN)
               continue;
            string c = HistoryDealGetString(d, DEAL_COMMENT);
            if(!TcIsKeyComment(c))
               continue;
            Remember(CopyKey("P", HistoryDealGetString(d, DEAL_SYMBOL), HistoryDealGetInteger(d, DEAL_MAGIC), c),
                     IntegerToString(HistoryDealGetInteger(d, DEAL_POSITION_ID)));
           }
         int no = HistoryOrdersTotal();
         for(int j = 0; j < no; j++)
           {
            ulong o = HistoryOrderGetTicket(j);
            if(o == 0 || !TcMt5IsPending(HistoryOrderGetInteger(o, ORDER_TYPE)))
               continue;
            string c = HistoryOrderGetString(o, ORDER_COMMENT);
            if(!TcIsKeyComment(c))
               continue;
            Remember(CopyKey("O", HistoryOrderGetString(o, ORDER_SYMBOL), HistoryOrderGetInteger(o, ORDER_MAGIC), c),
                     IntegerToString((long)o));
           }
        }
      //--- live ones last: they win over history entries with the same key
      for(int p = 0; p < PositionsTotal(); p++)
        {
         ulong t = PositionGetTicket(p);
         if(t == 0)
            continue;
         string c = PositionGetString(POSITION_COMMENT);
         if(TcIsKeyComment(c))
            Remember(CopyKey("P", PositionGetString(POSITION_SYMBOL), PositionGetInteger(POSITION_MAGIC), c), IntegerToString((long)t));
        }
      for(int k = 0; k < OrdersTotal(); k++)
        {
         ulong t = OrderGetTicket(k);
         if(t == 0 || !TcMt5IsPending(OrderGetInteger(ORDER_TYPE)))
            continue;
         string c = OrderGetString(ORDER_COMMENT);
         if(TcIsKeyComment(c))
            Remember(CopyKey("O", OrderGetString(ORDER_SYMBOL), OrderGetInteger(ORDER_MAGIC), c), IntegerToString((long)t));
        }
      PrintFormat("tradecopy: %d copies known by comment (positions, orders, %d days of history)", m_copyN, m_recoverDays);
     }

   void              Init(const long magic, const int deviation_points, const string symbols, const int recover_days)
     {
      m_magic = magic;
      m_deviation = deviation_points;
      m_symbolsCfg = symbols;
      m_recoverDays = recover_days;
      RebuildCopyIndex();
     }

   virtual string    Platform() { return "mt5"; }

   virtual string    SnapshotTail(const string corr)
     {
      CTcJsonWriter w;
      w.StrOpt("corr", corr);
      WriteAccount(w);
      string syms[];
      ArrayResize(syms, 0);
      for(int i = 0; i < PositionsTotal(); i++)
         if(PositionGetTicket(i) > 0)
            AddSymbol(syms, PositionGetString(POSITION_SYMBOL));
      for(int i2 = 0; i2 < OrdersTotal(); i2++)
         if(OrderGetTicket(i2) > 0)
            AddSymbol(syms, OrderGetString(ORDER_SYMBOL));
      if(StringLen(m_symbolsCfg) == 0)
        {
         for(int s = 0; s < SymbolsTotal(true); s++)
            AddSymbol(syms, SymbolName(s, true));
        }
      else
        {
         string cfg[];
         int nc = StringSplit(m_symbolsCfg, ',', cfg);
         for(int c = 0; c < nc; c++)
           {
            string one = cfg[c];
            StringTrimLeft(one);
            StringTrimRight(one);
            if(SymbolSelect(one, true))
               AddSymbol(syms, one);
           }
        }
      w.BeginArray("symbols");
      for(int k = 0; k < ArraySize(syms); k++)
         WriteSymbol(w, syms[k]);
      w.EndArray();

      w.BeginArray("positions");
      for(int p = 0; p < PositionsTotal(); p++)
        {
         ulong t = PositionGetTicket(p);
         if(t == 0)
            continue;
         w.BeginItem();
         w.Str("ticket", IntegerToString((long)t));
         w.Str("symbol", PositionGetString(POSITION_SYMBOL));
         w.Str("side", PositionGetInteger(POSITION_TYPE) == POSITION_TYPE_BUY ? "buy" : "sell");
         w.Num("volume", PositionGetDouble(POSITION_VOLUME));
         w.Num("price", PositionGetDouble(POSITION_PRICE_OPEN));
         w.Level("sl", PositionGetDouble(POSITION_SL));
         w.Level("tp", PositionGetDouble(POSITION_TP));
         w.IntOpt("magic", PositionGetInteger(POSITION_MAGIC));
         w.StrOpt("comment", PositionGetString(POSITION_COMMENT));
         w.IntOpt("time", TcServerMscToUtcNs(PositionGetInteger(POSITION_TIME_MSC)));
         w.EndObject();
        }
      w.EndArray();

      w.BeginArray("orders");
      for(int o = 0; o < OrdersTotal(); o++)
        {
         ulong t = OrderGetTicket(o);
         if(t == 0)
            continue;
         long type = OrderGetInteger(ORDER_TYPE);
         if(!TcMt5IsPending(type))
            continue;   // market orders in flight and stop-limit orders are not in the protocol
         w.BeginItem();
         w.Str("ticket", IntegerToString((long)t));
         w.Str("symbol", OrderGetString(ORDER_SYMBOL));
         w.Str("order_type", TcMt5OrderTypeText(type));
         w.Num("volume", OrderGetDouble(ORDER_VOLUME_CURRENT));
         w.Num("price", OrderGetDouble(ORDER_PRICE_OPEN));
         w.Level("sl", OrderGetDouble(ORDER_SL));
         w.Level("tp", OrderGetDouble(ORDER_TP));
         long tt = OrderGetInteger(ORDER_TYPE_TIME);
         if(tt == ORDER_TIME_SPECIFIED || tt == ORDER_TIME_SPECIFIED_DAY)
            w.IntOpt("expiration", TcServerToUtcNs((datetime)OrderGetInteger(ORDER_TIME_EXPIRATION)));
         w.IntOpt("magic", OrderGetInteger(ORDER_MAGIC));
         w.StrOpt("comment", OrderGetString(ORDER_COMMENT));
         w.EndObject();
        }
      w.EndArray();
      return w.Text();
     }

   virtual string    AccountTail()
     {
      CTcJsonWriter w;
      WriteAccount(w);
      w.Int("positions", PositionsTotal());
      return w.Text();
     }

   virtual string    AccountFingerprint()
     {
      return StringFormat("%.2f|%.2f|%.2f|%d", AccountInfoDouble(ACCOUNT_BALANCE), AccountInfoDouble(ACCOUNT_EQUITY),
                          AccountInfoDouble(ACCOUNT_MARGIN), PositionsTotal());
     }

   //--- exactly the positions and orders the snapshot lists (see CTcStateHash)
   virtual string    StateHash()
     {
      CTcStateHash h;
      for(int p = 0; p < PositionsTotal(); p++)
        {
         ulong t = PositionGetTicket(p);
         if(t == 0)
            continue;
         h.AddPosition((long)t, PositionGetDouble(POSITION_VOLUME), PositionGetDouble(POSITION_SL), PositionGetDouble(POSITION_TP));
        }
      for(int o = 0; o < OrdersTotal(); o++)
        {
         ulong t = OrderGetTicket(o);
         if(t == 0 || !TcMt5IsPending(OrderGetInteger(ORDER_TYPE)))
            continue;
         h.AddOrder((long)t, OrderGetDouble(ORDER_VOLUME_CURRENT), OrderGetDouble(ORDER_SL), OrderGetDouble(ORDER_TP),
                    OrderGetDouble(ORDER_PRICE_OPEN));
        }
      return h.Hex();
     }

   //--- the connector normally sends the follower ticket; without it the copy comment finds it
   virtual string    ResolveTicket(CTcJsonObject &cmd)
     {
      string t = cmd.Str("ticket");
      if(StringLen(t) > 0)
         return t;
      string c = cmd.Str("comment");
      if(!TcIsKeyComment(c))
         return "";
      string op = cmd.Str("op");
      long magic = Magic(cmd);
      if(op == "close" || op == "modify" || op == "close_by")
         return FindPositionByComment(cmd.Str("symbol"), magic, c);
      if(op == "pending_modify" || op == "pending_cancel")
         return FindOrderByComment(cmd.Str("symbol"), magic, c);
      return "";
     }

   virtual double    VolumeOf(const string ticket)
     {
      ulong t = (ulong)StringToInteger(ticket);
      if(t == 0)
         return 0.0;
      if(PositionSelectByTicket(t))
         return PositionGetDouble(POSITION_VOLUME);
      if(OrderSelect(t))
         return OrderGetDouble(ORDER_VOLUME_CURRENT);
      return 0.0;
     }

   virtual string    Execute(CTcJsonObject &cmd)
     {
      if(!TerminalInfoInteger(TERMINAL_TRADE_ALLOWED))
         return TcRefuseTail("ea: Algo Trading is switched off in the terminal");
      if(!MQLInfoInteger(MQL_TRADE_ALLOWED))
         return TcRefuseTail("ea: trading is not allowed for this program (Allow Algo Trading in its properties)");
      string op = cmd.Str("op");
      if(op == "open")
         return DoOpen(cmd);
      if(op == "pending_place")
         return DoPendingPlace(cmd);
      string ticket = ResolveTicket(cmd);
      if(StringLen(ticket) == 0)
         return TcRefuseTail("ea: " + op + " needs a ticket (none given, none found by comment)");
      if(op == "close")
         return DoClose(cmd, ticket);
      if(op == "modify")
         return DoModify(cmd, ticket);
      if(op == "close_by")
         return DoCloseBy(cmd, ticket);
      if(op == "pending_modify")
         return DoPendingModify(cmd, ticket);
      if(op == "pending_cancel")
         return DoPendingCancel(ticket);
      return TcRefuseTail("ea: unknown op " + op);
     }

   //--- an open / pending_place whose copy already exists (same symbol, magic and comment):
   //--- answered with that copy instead of trading again
   virtual string    FindCopy(CTcJsonObject &cmd)
     {
      string op = cmd.Str("op");
      string c = cmd.Str("comment");
      if((op != "open" && op != "pending_place") || !TcIsKeyComment(c))
         return "";
      string sym = cmd.Str("symbol");
      long magic = Magic(cmd);
      if(op == "open")
        {
         string t = FindPositionByComment(sym, magic, c);
         if(t == "")
            t = Remembered(CopyKey("P", sym, magic, c));
         if(t == "")
            return "";
         double vol = 0.0, price = 0.0;
         if(PositionSelectByTicket((ulong)StringToInteger(t)))
           {
            vol = PositionGetDouble(POSITION_VOLUME);
            price = PositionGetDouble(POSITION_PRICE_OPEN);
           }
         return TcResultTail(true, TRADE_RETCODE_DONE, "ea: already executed, copy " + t + " found by comment", t, price, vol, TcUtcNowNs());
        }
      string o = FindOrderByComment(sym, magic, c);
      if(o == "")
         o = Remembered(CopyKey("O", sym, magic, c));
      if(o == "")
         return "";
      return TcResultTail(true, TRADE_RETCODE_PLACED, "ea: already placed, order " + o + " found by comment", o, 0.0, 0.0, TcUtcNowNs());
     }

   //--- a command begun before a crash (journal B without R): did it happen?
   virtual string    Recover(CTcJsonObject &cmd, const string ticket, const double volume_before)
     {
      string op = cmd.Str("op");
      if(op == "open" || op == "pending_place")
         return FindCopy(cmd);            // "" = not found: it did not happen, execute
      ulong t = (ulong)StringToInteger(ticket);
      if(op == "close")
        {
         if(t > 0 && !PositionSelectByTicket(t))
            return TcResultTail(true, TRADE_RETCODE_DONE, "ea: recovered after restart, position closed", ticket, 0.0, volume_before, TcUtcNowNs());
         if(t > 0 && PositionGetDouble(POSITION_VOLUME) < volume_before - 0.000000005)
            return TcResultTail(true, TRADE_RETCODE_DONE, "ea: recovered after restart, position reduced", ticket, 0.0,
                                volume_before - PositionGetDouble(POSITION_VOLUME), TcUtcNowNs());
         return "";
        }
      if(op == "close_by")
        {
         ulong o = (ulong)StringToInteger(cmd.Str("opposite_ticket"));
         if((t > 0 && !PositionSelectByTicket(t)) || (o > 0 && !PositionSelectByTicket(o)))
            return TcResultTail(true, TRADE_RETCODE_DONE, "ea: recovered after restart, closed by", ticket, 0.0, 0.0, TcUtcNowNs());
         return "";
        }
      if(op == "pending_cancel")
        {
         if(t > 0 && !OrderSelect(t))
            return TcResultTail(true, TRADE_RETCODE_DONE, "ea: recovered after restart, order gone", ticket, 0.0, 0.0, TcUtcNowNs());
         return "";
        }
      return "";   // modify / pending_modify: setting the same levels again is harmless
     }
  };

#endif // TC_MT5_TERMINAL_MQH
//+------------------------------------------------------------------+
